"""`kmctl chaos run | sweep`: whole seeded runs judged by the checker.

`run` works against the cluster that is up; `sweep` starts a fresh cluster per seed (its own
state directory under ``--out``), runs it, stops it, and tabulates every run: the long
soak the chaos issue asks for. Both exit 0 when every check passes, 1 on a violation, 3 when
a run could not be carried out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmnode import supervisor
from kmnode.chaos.nemesis import FAULT_KINDS
from kmnode.cli.cluster_cmds import select_nodes
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    print_json,
    print_table,
)
from kmnode.config import ClusterConfig
from kmnode.errors import KmsimError

if TYPE_CHECKING:
    from kmnode.chaos.runner import RunConfig, RunOutcome

_FAULTS_HELP = (
    "Comma-separated fault kinds the nemesis cycles through (a seeded shuffle, repeated), "
    "'all' for every kind this cluster supports, or 'none' for a baseline. Kinds: "
    + ", ".join(FAULT_KINDS)
    + " (netns-partition: nodes in network namespaces only; poison: the target's host feeds "
    "garbage into every input it holds; tamper-state: the target's host changes stored "
    "contract state, only when named; tamper-blob: the target's host flips a bit of the "
    "run's dataset blob until the heal, only when named; recover: every node loses its "
    "sealed state and the cluster reopens with the signer's recovery share, only when named)."
)


def _run_options(f: Any) -> Any:
    """The options `run` and `sweep` share (one definition, one meaning)."""
    options = [
        click.option(
            "--duration",
            type=click.FloatRange(min=1.0),
            default=30.0,
            show_default=True,
            help="Seconds of client load and faults per run.",
        ),
        click.option(
            "--clients",
            type=click.IntRange(1, 32),
            default=3,
            show_default=True,
            help="Concurrent client threads issuing operations.",
        ),
        click.option(
            "--interval",
            type=click.FloatRange(min=0.5),
            default=3.0,
            show_default=True,
            help="Seconds of quiet before each fault, and seconds each fault is held.",
        ),
        click.option("--faults", "kinds", default="all", show_default=True, help=_FAULTS_HELP),
        click.option(
            "--recovery-bound",
            type=click.FloatRange(min=0.1),
            default=20.0,
            show_default=True,
            help="Seconds within which an operation must succeed after each heal, and every "
            "node must agree after the final heal.",
        ),
        click.option(
            "--no-scan",
            is_flag=True,
            help="Skip the search for plaintext keys in data directories, logs and MQTT.",
        ),
        click.option(
            "--contracts/--no-contracts",
            default=True,
            show_default=True,
            help="Deploy a token contract and mix its calls into the workload; check that "
            "every node published the same results and roots, that the results equal a "
            "reference replay, and that no argument or result reached the host in clear.",
        ),
        click.option(
            "--data/--no-data",
            default=True,
            show_default=True,
            help="Register a dataset and mix computations, grants and revocations into the "
            "workload; check every token against its grant and across nodes, that results "
            "reach and open for their user only, that computations on a tampered blob are "
            "refused, and that no row or result reached the host in clear.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]

    @functools.wraps(f)
    def bundled(*args: Any, **kwargs: Any) -> Any:
        settings = {name: kwargs.pop(name) for name in _SETTINGS}
        return f(*args, settings=settings, **kwargs)

    for option in reversed(options):
        bundled = option(bundled)
    return bundled


#: The shared options' parameter names, handed to the commands as one ``settings`` dict.
_SETTINGS = (
    "duration", "clients", "interval", "kinds", "recovery_bound", "no_scan", "contracts", "data",
)  # fmt: skip


def _run_config(seed: int, settings: dict[str, Any]) -> RunConfig:
    from kmnode.chaos.runner import RunConfig

    kinds = str(settings["kinds"])
    chosen = kinds.strip().lower()
    faults: tuple[str, ...] | None
    if chosen == "all":
        faults = None
    elif chosen == "none":
        faults = ()
    else:
        faults = tuple(k.strip() for k in kinds.split(",") if k.strip())
    try:
        return RunConfig(
            seed=seed,
            duration=settings["duration"],
            clients=settings["clients"],
            interval=settings["interval"],
            faults=faults,
            recovery_bound=settings["recovery_bound"],
            scan_plaintext=not settings["no_scan"],
            contracts=settings["contracts"],
            data=settings["data"],
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _execute(cfg: ClusterConfig, config: RunConfig, out_dir: Path, progress: Any) -> RunOutcome:
    from kmnode.chaos.faults import FaultError
    from kmnode.chaos.runner import RunError
    from kmnode.chaos.runner import run as chaos_run

    try:
        return chaos_run(cfg, config, out_dir, progress)
    except ValueError as exc:  # a fault kind this cluster cannot take
        raise CliError(str(exc), EXIT_USAGE) from None
    except (RunError, FaultError, KmsimError) as exc:
        raise CliError(f"chaos run (seed {config.seed}) failed: {exc}", EXIT_FAILURE) from None


def _stderr(as_json: bool) -> Any:
    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    return progress


@click.command("run")
@click.option("--seed", type=int, required=True, help="Seeds the fault schedule and the clients.")
@_run_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to save history.jsonl and final.json. Default: <state_dir>/chaos/seed-N.",
)
@pass_context
def run(
    ctx: CliContext, seed: int, settings: dict[str, Any], as_json: bool, out: Path | None
) -> None:
    """Run clients and a seeded nemesis against the running cluster, then check the history.

    Clients create, rotate, release, read and prove keys on random nodes while the nemesis
    injects faults. At the end every fault is healed, the nodes must agree within the recovery
    bound, and the checker judges the history and the nodes' committed state: no release
    without a committed request, allowed measurements only, identical keys everywhere, nothing
    committed lost, linearizable key records, no plaintext key on the host side, recovery in
    bound, damaged nodes refusing to start. With --contracts (the default) a fresh token
    contract's calls join the workload, and the contract checks join the verdict: the same
    published results and state roots on every node, the clients' results equal to a
    reference replay, no argument or result on the host side in clear. With --data (the
    default) a fresh dataset's computations, grants and revocations join too, and the data
    checks: every token within its grant and signed alike by every node, results only to
    their user and only once, every token ended, none of the data in clear on the host side.
    Exits 0 if every check passes, 1 on a violation (the seed, the history file and the first
    violating operation are printed), 3 if the run could not be carried out.

    \b
    Example: kmctl chaos run --seed 7 --duration 60
    Example: kmctl chaos run --seed 8 --faults partition,kill,pause --no-contracts --out runs/8
    """
    cfg = supervisor.effective_config(ctx.config())
    config = _run_config(seed, settings)
    out_dir = out or cfg.state_dir / "chaos" / f"seed-{seed}"
    outcome = _execute(cfg, config, out_dir, _stderr(as_json))
    if as_json:
        print_json({"seed": seed, **outcome.to_json()})
    else:
        _print_outcome(seed, outcome)
    if not outcome.result.valid:
        raise click.exceptions.Exit(EXIT_REFUSED)


def _print_outcome(seed: int, outcome: RunOutcome) -> None:
    result = outcome.result
    outcomes = ("ok", "fail", "info")
    counts = {kind: [c.get(o, 0) for o in outcomes] for kind, c in sorted(result.stats.items())}
    totals = [sum(row[i] for row in counts.values()) for i in range(len(outcomes))]
    print_table(
        f"chaos run, seed {seed}: operations",
        ["operation", "ok", "failed", "unknown"],
        [[kind, *row] for kind, row in [*counts.items(), ("all", totals)]],
    )
    faults = ", ".join(f"{k} x{n}" for k, n in sorted(result.faults.items())) or "none"
    click.echo(f"faults injected: {faults}")
    click.echo(f"recovery after the final heal: {outcome.recovery:.2f}s")
    print_table("checks", ["check", "result", "detail"], result.rows())
    if result.valid:
        click.echo("verdict: VALID")
        click.echo(f"history: {outcome.history_path}")
        return
    click.echo(f"verdict: INVALID (seed {seed})")
    click.echo(f"history: {outcome.history_path}")
    first = outcome.first_violation()
    if first is not None:
        click.echo(f"first violation: {first['message']}")
        if first["op"] is not None:
            click.echo(f"  operation: {json.dumps(first['op'], sort_keys=True)}")


def sweep_row(seed: int, nodes: int, outcome: RunOutcome) -> dict[str, Any]:
    """One line of the sweep table: what ran, what failed, how slow the worst recovery was."""
    result = outcome.result
    outcomes = [o for counts in result.stats.values() for o in counts.items()]
    recovery = result.checks.get("recovery")
    heal_worst = recovery.figure if recovery is not None and recovery.figure is not None else 0.0
    return {
        "seed": seed,
        "nodes": nodes,
        "ops": sum(n for _, n in outcomes),
        "ok": sum(n for o, n in outcomes if o == "ok"),
        "failed": sum(n for o, n in outcomes if o == "fail"),
        "unknown": sum(n for o, n in outcomes if o == "info"),
        "faults": sum(result.faults.values()),
        "fault_kinds": len(result.faults),
        "violations": sum(1 for c in result.checks.values() if not c.valid),
        "worst_recovery_s": round(max(heal_worst, outcome.recovery), 3),
        "valid": result.valid,
        "history": str(outcome.history_path),
    }


def failed_row(seed: int, nodes: int, error: str) -> dict[str, Any]:
    """The row of a run that could not be completed: counted as a violation, with why."""
    row: dict[str, Any] = dict.fromkeys(_SWEEP_COLUMNS, "-")
    row.update(seed=seed, nodes=nodes, violations=1, valid=False, history="", error=error)
    return row


_SWEEP_COLUMNS = (
    "seed", "nodes", "ops", "ok", "failed", "unknown", "faults", "fault_kinds", "violations",
    "worst_recovery_s",
)  # fmt: skip


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(_SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(_SWEEP_COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in _SWEEP_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """A sweep runs for hours, often in the background: SIGTERM must stop the cluster it
    started too (SystemExit runs the ``finally`` that stops it), not leave nodes behind."""
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("sweep")
@click.option("--seeds", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--first-seed", type=int, default=1, show_default=True)
@click.option(
    "-n", "--nodes", type=click.IntRange(1, 64), help="Nodes per cluster (as `kmctl up -n`)."
)
@_run_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Per-seed state, histories and the sweep table. Default: <state_dir>/sweep.",
)
@pass_context
def sweep(
    ctx: CliContext,
    seeds: int,
    first_seed: int,
    nodes: int | None,
    settings: dict[str, Any],
    as_json: bool,
    out: Path | None,
) -> None:
    """Run SEEDS chaos runs, each on a fresh cluster, and tabulate them.

    Each seed gets its own state directory under --out (a cluster is started, run and
    stopped, whatever happens), so runs cannot leak into each other. Writes sweep.jsonl and
    sweep.md there, and each run's report.json, history.jsonl and final.json in seed-N/.
    The cluster's ports must be free: stop a running cluster first (`kmctl down`). Exits 1 if
    any run found a violation, 3 if a run could not be carried out.

    The example is the soak recorded in bench/RESULTS.md.

    \b
    Example: kmctl chaos sweep --seeds 50 --duration 60
    """
    base = select_nodes(ctx, nodes)
    root = (out or base.state_dir / "sweep").resolve()
    root.mkdir(parents=True, exist_ok=True)
    progress = _stderr(as_json)
    rows: list[dict[str, Any]] = []
    failed_runs: list[int] = []
    with _sigterm_exits(), open(root / "sweep.jsonl", "a") as log:
        for seed in range(first_seed, first_seed + seeds):
            config = _run_config(seed, settings)
            seed_dir = root / f"seed-{seed}"
            cfg = base.model_copy(update={"state_dir": seed_dir / "state"})
            progress(f"seed {seed}: starting a {len(cfg.nodes)}-node cluster in {seed_dir}")
            try:
                supervisor.up(cfg)  # a failure here is the environment's: the sweep stops
                try:
                    outcome = _execute(cfg, config, seed_dir, progress)
                except KmsimError as exc:
                    if exc.exit_code == EXIT_USAGE:
                        raise
                    # The run itself broke down (say, no convergence after healing): a
                    # finding of this seed, recorded; the sweep goes on with the next.
                    failed_runs.append(seed)
                    row = failed_row(seed, len(cfg.nodes), exc.message)
                else:
                    report = {"seed": seed, **outcome.to_json()}
                    (seed_dir / "report.json").write_text(
                        json.dumps(report, indent=1, sort_keys=True)
                    )
                    row = sweep_row(seed, len(cfg.nodes), outcome)
            finally:
                supervisor.down(cfg)
            rows.append(row)
            log.write(json.dumps(row, sort_keys=True) + "\n")
            log.flush()
            verdict = "VALID" if row["valid"] else f"INVALID {row.get('error', '')}".strip()
            progress(
                f"seed {seed}: {verdict}, {row['ops']} ops, {row['faults']} faults, "
                f"worst recovery {row['worst_recovery_s']}s"
            )
    (root / "sweep.md").write_text(sweep_markdown(rows))
    if as_json:
        print_json({"runs": rows, "table": str(root / "sweep.md")})
    else:
        print_table(
            f"chaos sweep: {seeds} seeds x {settings['duration']:g}s",
            list(_SWEEP_COLUMNS),
            [[r[c] for c in _SWEEP_COLUMNS] for r in rows],
        )
        click.echo(f"table: {root / 'sweep.md'}")
    if failed_runs:
        raise CliError(f"runs that could not be completed: seeds {failed_runs}", EXIT_FAILURE)
    if not all(r["valid"] for r in rows):
        raise click.exceptions.Exit(EXIT_REFUSED)
