"""`kmctl chaos ...`: inject faults into a local cluster by hand, one at a time.

Process faults (kill, pause, resume, restart) and disk faults (corrupt) act from outside
through the supervisor's pid files (kmnode.chaos.faults). Link faults, the ring stall and the
service enclave crash are asked of the node itself through `/v1/chaos/...`
(kmnode.host.chaos_api): link rules apply to what a node SENDS, so "A B" installs a rule on A
for B and, unless --one-way, one on B for A.

Every command prints one line saying what it did (or JSON with --json). Exit codes follow
kmnode.cli.output: 1 when a check refuses (the node is not running, or running when it must be
stopped), 2 for bad usage, 3 when a node cannot be reached.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
)
from kmnode.client import NodeClient, NodeUnreachable, default_signer
from kmnode.config import ClusterConfig
from kmnode.errors import KmsimError

if TYPE_CHECKING:
    from kmnode.chaos.faults import FaultDone

F = TypeVar("F", bound=Callable[..., Any])
#: Chaos requests are local and quick; a node that takes longer is likely paused.
_API_TIMEOUT = 5.0


def _one_way(f: F) -> F:
    return click.option(
        "--one-way", is_flag=True, help="Only what A sends to B (default: both directions)."
    )(f)


def _config(ctx: CliContext) -> ClusterConfig:
    return supervisor.effective_config(ctx.config())


def _check_node(cfg: ClusterConfig, name: str) -> str:
    try:
        cfg.node(name)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), EXIT_USAGE) from None
    return name


def _client(cfg: ClusterConfig, name: str) -> NodeClient:
    """A client of node ``name``'s chaos routes, signed as this invocation's identity (an
    admin's: governance must also have chaos enabled)."""
    return NodeClient.for_node(cfg.node(_check_node(cfg, name)), _API_TIMEOUT, default_signer(cfg))


def _emit(as_json: bool, data: Any, line: str) -> None:
    if as_json:
        print_json(data)
    else:
        click.echo(line)


def _fault(as_json: bool, run: Callable[[], FaultDone]) -> None:
    """Run a process or disk fault, mapping its refusals to exit code 1."""
    from kmnode.chaos.faults import FaultError

    try:
        done = run()
    except FaultError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    _emit(as_json, done.to_dict(), done.summary)


@click.group(cls=KmctlGroup)
def chaos() -> None:
    """Inject faults: kill or pause nodes, partition or degrade links, corrupt disks.

    Link rules live in the nodes' memory: `chaos heal` removes them, and a restarted node
    starts without any.
    """


# --- processes ---------------------------------------------------------------------------------


@chaos.command("kill")
@click.argument("node")
@_as_json
@pass_context
def kill(ctx: CliContext, node: str, as_json: bool) -> None:
    """SIGKILL NODE's process (as a crash would). `chaos restart NODE` starts it again.

    \b
    Example: kmctl chaos kill km2
    """
    from kmnode.chaos import faults

    cfg = _config(ctx)
    _fault(as_json, lambda: faults.kill(cfg, _check_node(cfg, node)))


@chaos.command("pause")
@click.argument("node")
@_as_json
@pass_context
def pause(ctx: CliContext, node: str, as_json: bool) -> None:
    """SIGSTOP NODE: it keeps its connections but answers nothing until `chaos resume`.

    \b
    Example: kmctl chaos pause km3
    """
    from kmnode.chaos import faults

    cfg = _config(ctx)
    _fault(as_json, lambda: faults.pause(cfg, _check_node(cfg, node)))


@chaos.command("resume")
@click.argument("node")
@_as_json
@pass_context
def resume(ctx: CliContext, node: str, as_json: bool) -> None:
    """SIGCONT NODE after `chaos pause`.

    \b
    Example: kmctl chaos resume km3
    """
    from kmnode.chaos import faults

    cfg = _config(ctx)
    _fault(as_json, lambda: faults.resume(cfg, _check_node(cfg, node)))


@chaos.command("restart")
@click.argument("node")
@click.option("--no-wait", is_flag=True, help="Do not wait until the node is ready.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    help="Seconds the node may take to become ready.",
)
@_as_json
@pass_context
def restart(ctx: CliContext, node: str, no_wait: bool, timeout: float, as_json: bool) -> None:
    """Start a killed NODE again as `kmctl up` does, and wait until it is ready.

    Exits 1 if it is still running, or exits or is not ready in time (with its log's end).

    \b
    Example: kmctl chaos restart km2 --timeout 60
    """
    from kmnode.chaos import faults

    cfg = _config(ctx)
    _fault(
        as_json,
        lambda: faults.restart(cfg, _check_node(cfg, node), wait=not no_wait, timeout=timeout),
    )


@chaos.command("replace")
@click.argument("node")
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True, help="Seconds."
)
@_as_json
@pass_context
def replace(ctx: CliContext, node: str, timeout: float, as_json: bool) -> None:
    """Replace stopped member NODE, which cannot start, by a fresh node of the same name.

    For a node whose log is damaged mid-way or whose sealed state cannot be opened: its
    membership is removed through the leader, its data directory is kept aside as
    NODE.replaced-N, and it starts empty, attests, is admitted as a new member and receives the
    master secret over the attested channel. Refuses while NODE runs.

    \b
    Example: kmctl chaos replace km3 --timeout 120
    """
    from kmnode.chaos import faults

    cfg = _config(ctx)
    _fault(as_json, lambda: faults.replace(cfg, _check_node(cfg, node), timeout=timeout))


# --- links -------------------------------------------------------------------------------------


def _link(cfg: ClusterConfig, a: str, b: str, one_way: bool) -> list[tuple[str, str]]:
    """The (sender, receiver) pairs a link command installs rules for."""
    _check_node(cfg, a)
    _check_node(cfg, b)
    if a == b:
        raise CliError(f"a link needs two different nodes, not {a} and {b}", EXIT_USAGE)
    return [(a, b)] if one_way else [(a, b), (b, a)]


def _set_rules(
    ctx: CliContext, a: str, b: str, one_way: bool, rule: dict[str, Any]
) -> list[dict[str, Any]]:
    cfg = _config(ctx)
    return [
        {"node": sender, **_client(cfg, sender).post("/v1/chaos/rules", {"peer": peer, **rule})}
        for sender, peer in _link(cfg, a, b, one_way)
    ]


def _arrow(a: str, b: str, one_way: bool) -> str:
    return f"{a} -> {b}" if one_way else f"{a} <-> {b}"


@chaos.command("partition")
@click.argument("a")
@click.argument("b")
@_one_way
@_as_json
@pass_context
def partition(ctx: CliContext, a: str, b: str, one_way: bool, as_json: bool) -> None:
    """Drop every Raft message between A and B (or only A's to B with --one-way).

    \b
    Example: kmctl chaos partition km1 km2 --one-way
    """
    answers = _set_rules(ctx, a, b, one_way, {"partition": True})
    _emit(as_json, answers, f"partitioned {_arrow(a, b, one_way)}")


@chaos.command("delay")
@click.argument("a")
@click.argument("b")
@click.option("--ms", type=click.FloatRange(0, 60_000), required=True, help="Delay per message.")
@click.option(
    "--jitter-ms",
    type=click.FloatRange(0, 60_000),
    default=0.0,
    help="Vary each delay uniformly by up to this much either way.",
)
@_one_way
@_as_json
@pass_context
def delay(
    ctx: CliContext, a: str, b: str, ms: float, jitter_ms: float, one_way: bool, as_json: bool
) -> None:
    """Delay Raft messages between A and B by --ms milliseconds (± --jitter-ms).

    \b
    Example: kmctl chaos delay km1 km2 --ms 200 --jitter-ms 50
    """
    answers = _set_rules(ctx, a, b, one_way, {"delay_ms": ms, "jitter_ms": jitter_ms})
    jitter = f" ± {jitter_ms:g} ms" if jitter_ms else ""
    _emit(as_json, answers, f"delaying {_arrow(a, b, one_way)} by {ms:g} ms{jitter}")


def _percent_option(f: F) -> F:
    return click.option(
        "--percent", type=click.FloatRange(0, 100), required=True, help="Share of messages."
    )(f)


@chaos.command("drop")
@click.argument("a")
@click.argument("b")
@_percent_option
@_one_way
@_as_json
@pass_context
def drop(ctx: CliContext, a: str, b: str, percent: float, one_way: bool, as_json: bool) -> None:
    """Drop --percent of the Raft messages between A and B, at random (seeded per node).

    \b
    Example: kmctl chaos drop km1 km3 --percent 30
    """
    answers = _set_rules(ctx, a, b, one_way, {"drop": percent / 100})
    _emit(as_json, answers, f"dropping {percent:g}% of {_arrow(a, b, one_way)}")


@chaos.command("duplicate")
@click.argument("a")
@click.argument("b")
@_percent_option
@_one_way
@_as_json
@pass_context
def duplicate(
    ctx: CliContext, a: str, b: str, percent: float, one_way: bool, as_json: bool
) -> None:
    """Send --percent of the Raft messages between A and B twice.

    \b
    Example: kmctl chaos duplicate km2 km3 --percent 10 --one-way
    """
    answers = _set_rules(ctx, a, b, one_way, {"duplicate": percent / 100})
    _emit(as_json, answers, f"duplicating {percent:g}% of {_arrow(a, b, one_way)}")


@chaos.command("heal")
@click.argument("a", required=False)
@click.argument("b", required=False)
@_as_json
@pass_context
def heal(ctx: CliContext, a: str | None, b: str | None, as_json: bool) -> None:
    """Remove link rules: all of them; those to and from A; or those between A and B.

    Nodes that are not running hold no rules and are skipped. Exits 3 if a running node
    could not be healed (e.g. it is paused).

    \b
    Example: kmctl chaos heal km1 km2
    Example: kmctl chaos heal
    """
    cfg = _config(ctx)
    names = [n.name for n in cfg.nodes]
    if a is None:
        plan: list[tuple[str, str | None]] = [(n, None) for n in names]
        what = "all links"
    elif b is None:
        _check_node(cfg, a)
        plan = [(a, None)] + [(n, a) for n in names if n != a]
        what = f"every link of {a}"
    else:
        plan = [(sender, peer) for sender, peer in _link(cfg, a, b, one_way=False)]
        what = f"{a} <-> {b}"
    results: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for sender, peer in plan:
        body = {} if peer is None else {"peer": peer}
        try:
            answer = _client(cfg, sender).post("/v1/chaos/heal", body)
        except NodeUnreachable:
            results.append({"node": sender, "skipped": "not running"})
            continue
        except KmsimError as exc:
            failures.append((sender, exc.message))
            continue
        results.append({"node": sender, **answer})
    skipped = [r["node"] for r in results if "skipped" in r]
    note = f" (skipped {', '.join(skipped)}: not running)" if skipped else ""
    if failures:
        note += f"; NOT healed on {', '.join(sorted({n for n, _ in failures}))}"
    _emit(as_json, results, f"healed {what}{note}")
    if failures:
        raise CliError("; ".join(message for _, message in failures), EXIT_FAILURE)


@chaos.command("rules")
@click.argument("nodes", nargs=-1)
@_as_json
@pass_context
def rules(ctx: CliContext, nodes: tuple[str, ...], as_json: bool) -> None:
    """Show the link rules and fault counts of NODES (default: every node).

    \b
    Example: kmctl chaos rules km1 km2
    """
    cfg = _config(ctx)
    shown: dict[str, Any] = {}
    for name in nodes or [n.name for n in cfg.nodes]:
        try:
            shown[name] = _client(cfg, name).get("/v1/chaos/rules")
        except NodeUnreachable:
            shown[name] = None
    if as_json:
        print_json(shown)
        return
    for name, answer in shown.items():
        if answer is None:
            click.echo(f"{name}: not running")
            continue
        parts = [f"{peer}: {_describe_rule(rule)}" for peer, rule in answer["rules"].items()]
        stalled = ", ring stalled" if answer.get("ring_stalled") else ""
        click.echo(f"{name}: {'; '.join(parts) or 'no rules'}{stalled}")


def _describe_rule(rule: dict[str, Any]) -> str:
    if rule.get("partition"):
        return "partitioned"
    parts = []
    if rule.get("drop"):
        parts.append(f"drop {rule['drop'] * 100:g}%")
    if rule.get("delay_ms") or rule.get("jitter_ms"):
        parts.append(f"delay {rule['delay_ms']:g}±{rule['jitter_ms']:g} ms")
    if rule.get("duplicate"):
        parts.append(f"duplicate {rule['duplicate'] * 100:g}%")
    return ", ".join(parts)


# --- inside a node -----------------------------------------------------------------------------


@chaos.command("service-crash")
@click.argument("node")
@_as_json
@pass_context
def service_crash(ctx: CliContext, node: str, as_json: bool) -> None:
    """SIGKILL NODE's service enclave; the node restarts it on its next request (it then
    holds no keys until they are released to it again). Exits 1 if it is not running.

    \b
    Example: kmctl chaos service-crash km2
    """
    answer = _client(_config(ctx), node).post("/v1/chaos/service-crash")
    _emit(as_json, answer, f"killed {node}'s service enclave (pid {answer.get('killed')})")


@chaos.command("tamper-state")
@click.argument("node")
@click.option(
    "--mode",
    type=click.Choice(["flip", "swap", "rollback", "drop"]),
    required=True,
    help="flip a byte of a record, swap two records, put an older record back, or drop one.",
)
@click.option("--contract", metavar="NAME", help="Only this contract's records. Default: any.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@_as_json
@pass_context
def tamper_state(
    ctx: CliContext, node: str, mode: str, contract: str | None, seed: int, as_json: bool
) -> None:
    """Change NODE's stored contract state as a hostile host would. Its service enclave names
    the change when it next reads that record and stops executing (kmctl contracts roots shows
    why; kmctl contracts resync NODE repairs it). Exits 1 if there is nothing to change.

    \b
    Example: kmctl chaos tamper-state km2 --mode rollback --contract token
    """
    body: dict[str, Any] = {"mode": mode, "seed": seed}
    if contract is not None:
        body["contract"] = contract
    answer = _client(_config(ctx), node).post("/v1/chaos/tamper-state", body)
    _emit(as_json, answer, f"{node}: {answer.get('tampered')}")


@chaos.command("tamper-blob")
@click.argument("node")
@click.argument("dataset")
@_as_json
@pass_context
def tamper_blob(ctx: CliContext, node: str, dataset: str, as_json: bool) -> None:
    """Flip a bit of NODE's stored copy of DATASET's blob as a hostile host would. A
    computation on NODE then ends refused (blob-digest), releasing nothing; the token is spent.
    Exits 1 if NODE holds no copy.

    \b
    Example: kmctl chaos tamper-blob km2 salaries
    """
    client = _client(_config(ctx), node)
    digest = client.get(f"/v1/datasets/{urllib.parse.quote(dataset, safe='')}")["digest_ct"]
    answer = client.post("/v1/chaos/tamper-blob", {"digest": digest})
    _emit(as_json, answer, f"{node}: flipped a bit of {dataset}'s blob {digest[:16]}...")


@chaos.command("ring-stall")
@click.argument("node")
@click.option("--on/--off", "stalled", required=True, help="Stall or resume the ring drain.")
@_as_json
@pass_context
def ring_stall(ctx: CliContext, node: str, stalled: bool, as_json: bool) -> None:
    """Stop (--on) or restart (--off) NODE's host draining its service enclave's output ring.

    \b
    Example: kmctl chaos ring-stall km2 --on
    Example: kmctl chaos ring-stall km2 --off
    """
    answer = _client(_config(ctx), node).post("/v1/chaos/ring-stall", {"stalled": stalled})
    state = "stalled" if answer.get("stalled") else "draining again"
    _emit(as_json, answer, f"{node}: service ring {state}")


@chaos.command("poison")
@click.argument("node")
@click.option("--on/--off", "enabled", required=True, help="Turn NODE's host hostile, or back.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(0, 1000, min_open=True),
    default=40.0,
    show_default=True,
    help="Garbage actions per second.",
)
@_as_json
@pass_context
def poison(
    ctx: CliContext, node: str, enabled: bool, seed: int, rate: float, as_json: bool
) -> None:
    """NODE's host feeds seeded garbage into every input it holds (its KM enclave's circuit,
    its own API, every member's peer port) until --off, which prints what was sent, what came
    back, and any finding (a 5xx, an internal failure): there should be none.

    \b
    Example: kmctl chaos poison km2 --on --seed 7 --rate 100
    Example: kmctl chaos poison km2 --off
    """
    body = {"enabled": True, "seed": seed, "rate": rate} if enabled else {"enabled": False}
    answer = _client(_config(ctx), node).post("/v1/chaos/poison", body)
    stats = answer.get("stats", {})
    if enabled:
        text = f"{node}: host poisoning its inputs (seed {seed}, {rate:g}/s)"
    else:
        sent = ", ".join(f"{k} {v}" for k, v in stats.get("sent", {}).items()) or "nothing"
        found = stats.get("problems") or ["none"]
        text = f"{node}: poison stopped; sent {sent}; findings: {'; '.join(found)}"
    _emit(as_json, answer, text)


# --- disks -------------------------------------------------------------------------------------


@chaos.command("corrupt")
@click.argument("node")
@click.option(
    "--torn-tail", is_flag=True, help="Leave a half-written record at the end of the Raft log."
)
@click.option(
    "--flip-byte",
    type=click.Choice(["middle", "tail"]),
    help="Flip a byte of a Raft record: in the middle (refused at start) or the last one.",
)
@click.option("--sealed", is_flag=True, help="Flip a byte of the sealed enclave state.")
@_as_json
@pass_context
def corrupt(
    ctx: CliContext,
    node: str,
    torn_tail: bool,
    flip_byte: str | None,
    sealed: bool,
    as_json: bool,
) -> None:
    """Damage a STOPPED node's files, as a crash or a bad disk would; exits 1 if it runs.

    Give exactly one of --torn-tail (the next start truncates it), --flip-byte middle|tail
    (middle: the next start refuses, naming the offset) or --sealed (the node cannot unseal
    its state and refuses to start).

    \b
    Example: kmctl chaos corrupt km3 --flip-byte middle
    """
    from kmnode.chaos import faults

    if sum([torn_tail, flip_byte is not None, sealed]) != 1:
        raise CliError("give exactly one of --torn-tail, --flip-byte middle|tail, --sealed")
    cfg = _config(ctx)
    _check_node(cfg, node)
    if torn_tail:
        _fault(as_json, lambda: faults.torn_tail(cfg, node))
    elif sealed:
        _fault(as_json, lambda: faults.tamper_sealed(cfg, node))
    else:
        where: Literal["middle", "tail"] = "middle" if flip_byte == "middle" else "tail"
        _fault(as_json, lambda: faults.flip_byte(cfg, node, where))


# Whole runs, sweeps and replacement live in their own module; registered here so that the
# `chaos` group is complete wherever it is imported from.
from kmnode.cli.chaos_run_cmds import run, sweep  # noqa: E402
from kmnode.cli.netns_cmds import netns  # noqa: E402

for _command in (run, sweep, netns):
    chaos.add_command(_command)
