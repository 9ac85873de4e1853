"""`kmctl keys | policy | members | releases | prove | attest show`: a running cluster's API.

Every command is one or a few calls of docs/operator-api.md. Writes may be sent to any node:
a follower names the leader (421) and the client retries there once. `--node` picks the node
to talk to; by default it is the first node of the cluster that accepts a connection.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kmnode import supervisor
from kmnode.chaos.faults import FaultError, replace
from kmnode.cli.attest_cmds import attest
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.governance_cmds import governed
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.client import DEFAULT_TIMEOUT, ClusterClient
from kmnode.errors import KmsimError

F = TypeVar("F", bound=Callable[..., Any])

_MEASUREMENT = re.compile(r"^[0-9a-f]{64}$")
_ROLE = click.Choice(["km", "service"])
#: Slack on top of the server-side wait, so the server's own timeout answer reaches us.
_WAIT_SLACK = 5.0


def _linearizable(f: F) -> F:
    return click.option(
        "--linearizable",
        is_flag=True,
        help="Have the node confirm with the leader that its state is current first.",
    )(f)


#: The most pages `keys list` reads (10,000 keys each): bounded whatever a node answers.
MAX_KEY_PAGES = 10_000


def _client(ctx: CliContext, node: str | None) -> ClusterClient:
    return ctx.client(node)


def _read_query(linearizable: bool, **extra: str | None) -> dict[str, str]:
    query = {k: v for k, v in extra.items() if v is not None}
    if linearizable:
        query["linearizable"] = "1"
    return query


def _measurement(value: str) -> str:
    lowered = value.strip().lower()
    if not _MEASUREMENT.match(lowered):
        raise CliError(f"{value!r} is not a measurement (64 hex digits)", EXIT_USAGE)
    return lowered


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _write_result(as_json: bool, answer: Any, line: str) -> None:
    if as_json:
        print_json(answer)
    else:
        click.echo(line)


# --- keys --------------------------------------------------------------------------------------


@click.group(cls=KmctlGroup)
def keys() -> None:
    """Named keys: create, list, show, rotate, and release them to nodes' service enclaves."""


@keys.command("create")
@click.argument("name")
@click.option(
    "--allow-service",
    "allowed",
    multiple=True,
    metavar="HEX",
    help="Service enclave measurement that may receive this key (repeatable). "
    "Default: the policy's service measurements.",
)
@_api_node
@_as_json
@pass_context
def keys_create(
    ctx: CliContext, name: str, allowed: tuple[str, ...], api_node: str | None, as_json: bool
) -> None:
    """Create key NAME at generation 1. Exits 1 if it already exists.

    \b
    Example: kmctl keys create payments
    """
    body: dict[str, Any] = {"name": name}
    if allowed:
        body["allowed_service"] = [_measurement(m) for m in allowed]
    answer = _client(ctx, api_node).post("/v1/keys", body)
    generation = answer.get("generation") if isinstance(answer, dict) else "?"
    _write_result(as_json, answer, f"created key {name} (generation {generation})")


@keys.command("list")
@_api_node
@_linearizable
@_as_json
@pass_context
def keys_list(ctx: CliContext, api_node: str | None, linearizable: bool, as_json: bool) -> None:
    """List every key with its current generation and the service enclaves allowed to use it.

    \b
    Example: kmctl keys list --linearizable
    """
    client = _client(ctx, api_node)
    found: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(MAX_KEY_PAGES):  # the node answers in pages of names
        query = _read_query(linearizable, after=after)
        page = client.get("/v1/keys", query)
        found += page.get("keys", []) if isinstance(page, dict) else []
        after = page.get("next") if isinstance(page, dict) else None
        if not isinstance(after, str):
            break
    answer = {"keys": found}
    if as_json:
        print_json(answer)
        return
    rows = [
        (
            k.get("name"),
            k.get("generation"),
            "\n".join(k.get("allowed_service") or []) or "(policy default)",
            k.get("created_index"),
            k.get("rotated_index") if k.get("rotated_index") is not None else "-",
        )
        for k in answer.get("keys", [])
    ]
    print_table(
        f"{len(rows)} key(s)", ["key", "generation", "allowed service", "created", "rotated"], rows
    )


@keys.command("show")
@click.argument("name")
@_api_node
@_linearizable
@_as_json
@pass_context
def keys_show(
    ctx: CliContext, name: str, api_node: str | None, linearizable: bool, as_json: bool
) -> None:
    """Show key NAME and, per generation, a fingerprint of the key bytes the node derives.

    The fingerprint is a MAC, never the key: equal fingerprints on two nodes prove they hold
    the same key. Exits 2 if there is no such key.

    \b
    Example: kmctl keys show payments --node km3
    """
    client = _client(ctx, api_node)
    answer = client.get(f"/v1/keys/{_quoted(name)}", _read_query(linearizable))
    if as_json:
        print_json(answer)
        return
    fingerprints = answer.get("fingerprints") or {}
    rows: list[tuple[str, Any]] = [
        (field, answer[field]) for field in answer if field not in ("fingerprints",)
    ]
    rows += [(f"fingerprint g{gen}", fp) for gen, fp in sorted(fingerprints.items(), key=_gen)]
    print_table(f"key {name} (as seen by {client.chosen})", ["field", "value"], rows)


def _gen(item: tuple[str, Any]) -> int:
    return int(item[0]) if str(item[0]).isdigit() else 0


@keys.command("rotate")
@click.argument("name")
@_api_node
@_as_json
@pass_context
def keys_rotate(ctx: CliContext, name: str, api_node: str | None, as_json: bool) -> None:
    """Move key NAME to a new generation (a new derived key); old generations stay usable.

    \b
    Example: kmctl keys rotate payments
    """
    answer = _client(ctx, api_node).post(f"/v1/keys/{_quoted(name)}/rotate")
    generation = answer.get("generation") if isinstance(answer, dict) else "?"
    _write_result(as_json, answer, f"rotated key {name} to generation {generation}")


@keys.command("release")
@click.argument("name")
@click.option("--to", "target", metavar="NAME", help="Release to this node's service enclave.")
@click.option("--all", "to_all", is_flag=True, help="Release to every member node.")
@click.option("--generation", type=click.IntRange(min=1), help="Default: the current one.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0.1, max=300.0),
    default=10.0,
    show_default=True,
    help="Seconds the cluster may take to commit each outcome.",
)
@_api_node
@click.option("--via", "via", metavar="NAME", hidden=True, help="Former name of --node.")
@_as_json
@pass_context
def keys_release(
    ctx: CliContext,
    name: str,
    target: str | None,
    to_all: bool,
    generation: int | None,
    wait: float,
    api_node: str | None,
    via: str | None,
    as_json: bool,
) -> None:
    """Release key NAME to a node's service enclave (after local attestation), or to all.

    Prints one row per node: provisioned, refused (with the reason) or requested (not yet
    settled). Exits 1 if any release was refused.

    \b
    Example: kmctl keys release payments --to km2
    Example: kmctl keys release payments --all --generation 2 --node km1
    """
    if (target is None) == (not to_all):
        hint = (
            " (--node is the node whose API to use, as in every command; the node to release to "
            "is --to NAME)"
            if api_node and not to_all
            else ""
        )
        raise CliError(f"give exactly one of --to NAME or --all{hint}", EXIT_USAGE)
    via = api_node or via
    body: dict[str, Any] = {"node": target or "all", "timeout": wait}
    if generation is not None:
        body["generation"] = generation
    answer = _client(ctx, via).post(
        f"/v1/keys/{_quoted(name)}/release", body, timeout=wait + _WAIT_SLACK
    )
    releases = answer.get("releases", []) if isinstance(answer, dict) else []
    if as_json:
        print_json(answer)
    else:
        _releases_table(f"release of {name}", releases)
    if any(r.get("status") == "refused" for r in releases):
        raise click.exceptions.Exit(EXIT_REFUSED)


def _releases_table(title: str, releases: list[dict[str, Any]]) -> None:
    print_table(
        title,
        ["release", "node", "key", "generation", "status", "reason"],
        [
            (
                r.get("release") or r.get("id"),
                r.get("node"),
                r.get("key"),
                r.get("generation"),
                r.get("status"),
                r.get("reason") or "",
            )
            for r in releases
        ],
    )


# --- releases ------------------------------------------------------------------------------


@click.group(cls=KmctlGroup)
def releases() -> None:
    """The replicated record of key releases and their outcomes."""


@releases.command("list")
@click.option("--key", metavar="NAME", help="Only releases of this key.")
@_api_node
@_linearizable
@_as_json
@pass_context
def releases_list(
    ctx: CliContext, key: str | None, api_node: str | None, linearizable: bool, as_json: bool
) -> None:
    """List releases: which key generation went to which node, and whether it was provisioned.

    \b
    Example: kmctl releases list --key payments
    """
    answer = _client(ctx, api_node).get("/v1/releases", _read_query(linearizable, key=key))
    if as_json:
        print_json(answer)
        return
    found = answer.get("releases", [])
    _releases_table(f"{len(found)} release(s)", found)


# --- policy --------------------------------------------------------------------------------


@click.group(cls=KmctlGroup)
def policy() -> None:
    """The replicated attestation policy: allowed measurements, TCB levels, revoked platforms."""


@policy.command("get")
@_api_node
@_linearizable
@_as_json
@pass_context
def policy_get(ctx: CliContext, api_node: str | None, linearizable: bool, as_json: bool) -> None:
    """Show the policy every quote is verified against now (it changes only through Raft).

    \b
    Example: kmctl policy get --linearizable
    """
    answer = _client(ctx, api_node).get("/v1/policy", _read_query(linearizable))
    if as_json:
        print_json(answer)
        return
    rows: list[tuple[str, Any]] = []
    for setting, value in answer.items():
        if isinstance(value, dict):
            rows += [(f"{setting}.{k}", _listing(v)) for k, v in value.items()]
        else:
            rows.append((setting, _listing(value)))
    print_table("attestation policy", ["setting", "value"], rows)


def _listing(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) or "(none)"
    return str(value)


def _policy_change(
    ctx: CliContext, api_node: str | None, as_json: bool, path: str, body: dict[str, Any], line: str
) -> None:
    governed(ctx, api_node, path, body, line, as_json)


@policy.command("allow")
@click.option("--role", type=_ROLE, required=True, help="Which enclave the measurement is for.")
@click.argument("measurement")
@_api_node
@_as_json
@pass_context
def policy_allow(
    ctx: CliContext, role: str, measurement: str, api_node: str | None, as_json: bool
) -> None:
    """Allow enclaves with MEASUREMENT (64 hex digits) in ROLE to attest.

    A new build's measurements are what `kmctl attest measure` prints where it is installed.

    \b
    Example: kmctl policy allow --role km "$NEW_KM_MEASUREMENT"
    """
    value = _measurement(measurement)
    body = {"role": role, "measurement": value}
    _policy_change(ctx, api_node, as_json, "/v1/policy/allow", body, f"allowed {role} {value}")


@policy.command("disallow")
@click.option("--role", type=_ROLE, required=True, help="Which enclave the measurement is for.")
@click.argument("measurement")
@_api_node
@_as_json
@pass_context
def policy_disallow(
    ctx: CliContext, role: str, measurement: str, api_node: str | None, as_json: bool
) -> None:
    """Stop accepting MEASUREMENT in ROLE. Exits 1 if the cluster refuses (e.g. last one).

    \b
    Example: kmctl policy disallow --role km "$OLD_KM_MEASUREMENT"
    """
    value = _measurement(measurement)
    body = {"role": role, "measurement": value}
    _policy_change(
        ctx, api_node, as_json, "/v1/policy/disallow", body, f"disallowed {role} {value}"
    )


@policy.command("revoke-platform")
@click.argument("platform_id")
@_api_node
@_as_json
@pass_context
def policy_revoke_platform(
    ctx: CliContext, platform_id: str, api_node: str | None, as_json: bool
) -> None:
    """Revoke PLATFORM_ID: its quotes are refused from now on, whatever they measure.

    \b
    Example: kmctl policy revoke-platform platform-2
    """
    body = {"platform_id": platform_id}
    path = "/v1/policy/revoke-platform"
    _policy_change(ctx, api_node, as_json, path, body, f"revoked platform {platform_id}")


# --- members -------------------------------------------------------------------------------


@click.group(cls=KmctlGroup)
def members() -> None:
    """Cluster membership as committed through Raft."""


@members.command("list")
@_api_node
@_linearizable
@_as_json
@pass_context
def members_list(ctx: CliContext, api_node: str | None, linearizable: bool, as_json: bool) -> None:
    """List members with their platform, addresses, and whether they vote.

    \b
    Example: kmctl members list --linearizable
    """
    answer = _client(ctx, api_node).get("/v1/members", _read_query(linearizable))
    if as_json:
        print_json(answer)
        return
    voters = set(answer.get("voters") or [])
    rows = [
        (
            m.get("name"),
            m.get("platform_id"),
            f"{m.get('host')}:{m.get('peer_port')}",
            f"{m.get('host')}:{m.get('api_port')}",
            m.get("joined_index"),
            "yes" if m.get("name") in voters else "no",
        )
        for m in answer.get("members", [])
    ]
    print_table(
        f"{len(rows)} member(s)", ["node", "platform", "peer", "api", "joined", "voter"], rows
    )


@members.command("admit")
@click.argument("name")
@_api_node
@_as_json
@pass_context
def members_admit(ctx: CliContext, name: str, api_node: str | None, as_json: bool) -> None:
    """Propose admitting node NAME as the cluster file describes it (platform, addresses): a
    joining node stays pending, with nothing, until such a proposal passes.

    \b
    Example: kmctl members admit km4 -c cluster.yaml
    """
    try:
        spec = ctx.config().node(name)
    except KeyError as exc:
        raise CliError(f"{exc.args[0]}: add it to the cluster file first", EXIT_USAGE) from None
    action = {"op": "node.admit", "member": spec.member_record()}
    governed(ctx, api_node, "/v1/proposals", {"actions": [action]}, f"admitted {name}", as_json)


@members.command("remove")
@click.argument("name")
@_api_node
@_as_json
@pass_context
def members_remove(ctx: CliContext, name: str, api_node: str | None, as_json: bool) -> None:
    """Remove node NAME from the cluster (a committed membership change).

    \b
    Example: kmctl members remove km4
    """
    governed(ctx, api_node, "/v1/members/remove", {"name": name}, f"removed member {name}", as_json)


@members.command("transfer-leader")
@click.argument("node")
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60.0),
    default=5.0,
    show_default=True,
    help="Seconds to wait for NODE to lead.",
)
@_api_node
@_as_json
@pass_context
def members_transfer_leader(
    ctx: CliContext, node: str, timeout: float, api_node: str | None, as_json: bool
) -> None:
    """Hand the leadership to member NODE (an admin's act): before taking the leader down
    for maintenance, or to move it next to its clients. Exits 1 if NODE is not a voting
    member, and if it does not lead within the timeout.

    \b
    Example: kmctl members transfer-leader km2
    """
    answer = _client(ctx, api_node).post(
        "/v1/members/transfer-leader", {"to": node, "timeout": timeout}, timeout=timeout + 10
    )
    if as_json:
        print_json(answer)
    elif answer.get("moved"):
        click.echo(f"leadership moved from {answer.get('previous')} to {answer.get('leader')}")
    else:
        click.echo(f"{answer.get('leader')} already leads")


@members.command("replace")
@click.argument("name")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds for the removal, the admission and the fresh node to be ready.",
)
@_as_json
@pass_context
def members_replace(ctx: CliContext, name: str, timeout: float, as_json: bool) -> None:
    """Replace member NAME by a fresh node of the same name and platform, running this
    installation's build: stop it, remove it (a proposal), admit it again (a proposal), keep
    its directory aside and start it empty; it attests, joins, and receives the master secret
    over the attested channel. One node at a time, this moves a running cluster to a new KM
    build: allow the build's measurements by proposal first (kmctl policy allow), and list the
    old build's KM measurement in cluster.yaml's policy.km_measurements beside @current while
    the upgrade runs. In the development profile the single admin passes both proposals at
    once.

    \b
    Example: kmctl members replace km2
    """
    given = ctx.config()
    # The fresh node starts with the cluster file's policy as it is now: during an upgrade it
    # lists the old build's measurement too, so the new build accepts the member it joins.
    cfg = supervisor.effective_config(given).model_copy(update={"policy": given.policy})
    try:
        cfg.node(name)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), EXIT_USAGE) from None
    supervisor.write_effective_config(cfg)
    record = supervisor.running(cfg).get(name)
    if record is not None:
        supervisor.stop_processes({name: record})
        supervisor.pid_path(cfg, name).unlink(missing_ok=True)
    try:
        done = replace(cfg, name, timeout=timeout)
    except FaultError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    if as_json:
        print_json({"node": name, **done.detail})
        return
    click.echo(done.summary)


# --- attest show and prove ------------------------------------------------------------------


@click.command("show")
@click.argument("node")
@_as_json
@pass_context
def attest_show(ctx: CliContext, node: str, as_json: bool) -> None:
    """Ask running node NODE for a fresh quote of its KM enclave, verified by that node
    against the replicated policy (not the one in cluster.yaml). Exits 1 if refused.

    \b
    Example: kmctl attest show km2
    """
    client = _client(ctx, node)
    answer = client.get("/v1/attest")
    verification = answer.get("verification") or {}
    refused = _refused(verification)
    if as_json:
        print_json(answer)
    else:
        size = len(str(answer.get("quote") or "")) // 2
        print_table(f"verified by {node}", ["check", "result", "detail"], _check_rows(verification))
        identity = answer.get("identity") or {}
        click.echo(f"quote of {node} ({size} bytes): {'REFUSED' if refused else 'accepted'}")
        click.echo(", ".join(f"{k} {v}" for k, v in identity.items()))
    if refused:
        raise click.exceptions.Exit(EXIT_REFUSED)


def _refused(verification: Any) -> bool:
    if not isinstance(verification, dict):
        return False
    if verification.get("verdict") == "refused" or verification.get("accepted") is False:
        return True
    checks = verification.get("checks")
    return isinstance(checks, list) and any(
        isinstance(c, dict) and c.get("ok") is False for c in checks
    )


def _check_rows(verification: Any) -> list[tuple[Any, str, Any]]:
    """Rows from either a list of {check, ok, detail} or a mapping check → detail."""
    if not isinstance(verification, dict):
        return []
    checks = verification.get("checks")
    error = verification.get("error")
    failed = [("refused", "FAILED", error)] if error else []
    if isinstance(checks, list):
        return [
            (c.get("check"), "ok" if c.get("ok", True) else "FAILED", c.get("detail", ""))
            for c in checks
            if isinstance(c, dict)
        ] + failed
    skip = {"verdict", "accepted", "error"}
    return [(name, "ok", detail) for name, detail in verification.items() if name not in skip]


attest.add_command(attest_show)


@click.command("prove")
@click.argument("key")
@click.option("--generation", type=click.IntRange(min=1), required=True)
@click.option("--challenge", metavar="HEX", required=True, help="Bytes to MAC, hexadecimal.")
@click.option("--node", "target", metavar="NAME", help="Node whose service enclave answers.")
@click.option("--all", "to_all", is_flag=True, help="Ask every node's service enclave.")
@_as_json
@pass_context
def prove(
    ctx: CliContext,
    key: str,
    generation: int,
    challenge: str,
    target: str | None,
    to_all: bool,
    as_json: bool,
) -> None:
    """Have a service enclave MAC CHALLENGE with KEY at GENERATION, proving it holds the key.

    Nodes holding the same key return the same MAC. The enclave also writes the record to its
    ring buffer, which the host publishes on MQTT. With --all, the table says whether every
    node agrees; exits with the first failure's code if some node could not prove.

    \b
    Example: kmctl prove payments --generation 1 --challenge 00ff --all
    """
    if target is not None and to_all:
        raise CliError("give at most one of --node NAME or --all", EXIT_USAGE)
    try:
        bytes.fromhex(challenge)
    except ValueError:
        raise CliError("--challenge must be hexadecimal", EXIT_USAGE) from None
    if not challenge:
        raise CliError("--challenge must not be empty", EXIT_USAGE)
    body = {"key": key, "generation": generation, "challenge": challenge.lower()}
    if not to_all:
        answer = _client(ctx, target).post("/v1/service/prove", body)
        _write_result(as_json, answer, f"{answer.get('node')}: mac {answer.get('mac')}")
        return
    cfg = supervisor.effective_config(ctx.config())
    signer = ctx.signer(cfg)
    results: list[dict[str, Any]] = []
    failure: KmsimError | None = None
    for spec in cfg.nodes:
        try:
            client = ClusterClient(cfg, spec.name, DEFAULT_TIMEOUT, signer)
            answer = client.post("/v1/service/prove", body)
            results.append({"node": spec.name, "mac": answer.get("mac"), "error": None})
        except KmsimError as exc:
            failure = failure or exc
            results.append({"node": spec.name, "mac": None, "error": exc.message})
    macs = {r["mac"] for r in results if r["mac"] is not None}
    agree = len(macs) == 1 and failure is None
    if as_json:
        print_json({"key": key, "generation": generation, "agree": agree, "results": results})
    else:
        print_table(
            f"proofs of {key} generation {generation}: "
            + ("all nodes agree" if agree else "NOT all nodes agree"),
            ["node", "mac", "error"],
            [(r["node"], _short(r["mac"]), r["error"] or "") for r in results],
        )
    if failure is not None:
        raise click.exceptions.Exit(failure.exit_code)
    if not agree:
        raise click.exceptions.Exit(EXIT_REFUSED)


def _short(mac: str | None) -> str:
    """Enough of a MAC to compare by eye; --json has it whole."""
    if mac is None:
        return "-"
    return mac if len(mac) <= 40 else mac[:32] + "…"
