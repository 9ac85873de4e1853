"""`kmctl up | down | status | node run`: the cluster's processes on this machine."""

from __future__ import annotations

import contextlib
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.client import NodeClient, NodeUnreachable
from kmnode.config import DEFAULT_CONFIG_NAME, ClusterConfig
from kmnode.errors import KmsimError

_STATUS_TIMEOUT = 2.0
# Literals, not supervisor's constants: kmnode.supervisor imports kmnode.cli (the client), so
# nothing of it may be read while this module is being imported.
_READY_TIMEOUT = 30.0
_STOP_GRACE = 5.0
#: Phases worth a line of their own; the others only update the spinner.
_MILESTONES = ("started", "joined", "running", "already running", "resuming", "development profile")


def select_nodes(ctx: CliContext, count: int | None) -> ClusterConfig:
    """The config with its first ``count`` nodes; the embedded defaults grow to ``count``."""
    cfg = ctx.config()
    if count is None or count == len(cfg.nodes):
        return cfg
    if count < len(cfg.nodes):
        return cfg.model_copy(update={"nodes": cfg.nodes[:count]})
    if ctx.config_path is None and not (Path.cwd() / DEFAULT_CONFIG_NAME).exists():
        return ClusterConfig.default(count).model_copy(update={"state_dir": cfg.state_dir})
    source = ctx.config_path or Path.cwd() / DEFAULT_CONFIG_NAME
    raise CliError(
        f"-n {count}: {source} defines only {len(cfg.nodes)} nodes (add them to the file)",
        EXIT_USAGE,
    )


@click.command("up")
@click.option(
    "-n",
    "--nodes",
    "count",
    type=click.IntRange(1, 64),
    help="Start the first N nodes of the cluster file (the embedded defaults: N nodes).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=_READY_TIMEOUT,
    show_default=True,
    help="Seconds each node may take to become ready.",
)
@click.option(
    "--recover",
    is_flag=True,
    help="Nodes that lost their sealed state start in recovery mode: they replay the ledger "
    "and wait for recovery shares (kmctl recovery submit).",
)
@pass_context
def up(ctx: CliContext, count: int | None, timeout: float, recover: bool) -> None:
    """Start the cluster on this machine and wait until every node has joined.

    Starts the embedded MQTT broker (unless mqtt.url is set), then the first node, which
    bootstraps the cluster, then each other node in turn once the previous one is ready.
    Processes run detached, with logs in <state_dir>/logs and pid files in <state_dir>/run.
    Prints the status table. If the cluster is already up, says so and exits 0; if a node
    does not become ready, prints the end of its log, stops what it started, and exits 3.

    With --recover (every node lost its sealed state, or runs a KM build that cannot open
    it), the nodes start in recovery mode and `up` returns once they wait for shares; the
    recovery holders then run `kmctl recovery submit --as NAME`.

    \b
    Example: kmctl up -c cluster.yaml
    Example: kmctl up --recover
    """
    cfg = select_nodes(ctx, count)
    console = Console(stderr=True)
    with console.status(f"starting cluster {cfg.cluster!r}") as spinner:

        def progress(name: str, message: str) -> None:
            spinner.update(f"{name}: {message}")
            if message.startswith(_MILESTONES):
                console.print(f"  {name}: {message}", highlight=False)

        result = supervisor.up(cfg, timeout=timeout, progress=progress, recover=recover)
    if result.already_up:
        click.echo(f"cluster {cfg.cluster!r} is already up", err=True)
    else:
        click.echo(f"started {', '.join(result.started)}; config in {result.config_file}", err=True)
    show_status(cfg, as_json=False)


@click.command("down")
@click.option(
    "--grace",
    type=click.FloatRange(min=0.0),
    default=_STOP_GRACE,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
@pass_context
def down(ctx: CliContext, grace: float) -> None:
    """Stop every node and the embedded broker started by `kmctl up`; leave nothing running.

    Each recorded process gets SIGTERM, then SIGKILL after the grace period. A pid file whose
    pid now belongs to another program is removed without signalling it. Node data is kept,
    so the next `kmctl up` resumes the same cluster.

    \b
    Example: kmctl down --grace 30
    """
    cfg = ctx.config()
    outcomes = supervisor.down(cfg, grace=grace)
    if not outcomes:
        click.echo(f"nothing to stop: no pid files in {supervisor.run_dir(cfg)}")
    for outcome in outcomes:
        note = (
            " (pid reused by another program: not signalled)"
            if outcome.result == "not ours"
            else ""
        )
        click.echo(f"{outcome.name} (pid {outcome.pid}): {outcome.result}{note}")


def _node_status(cfg: ClusterConfig, name: str) -> dict[str, Any]:
    client = NodeClient.for_node(cfg.node(name), _STATUS_TIMEOUT)
    try:
        status = client.get("/v1/status")
    except NodeUnreachable:
        return {"node": name, "state": "down", "error": "not reachable", "status": None}
    except KmsimError as exc:
        return {"node": name, "state": "error", "error": exc.message, "status": None}
    ready, phase = supervisor.describe_readiness(status)
    state = "ready" if ready else "not ready"
    if isinstance(status, dict) and status.get("recovering"):
        ready, state = False, "recovering"
    return {"node": name, "state": state, "error": None if ready else phase, "status": status}


_STATUS_COLUMNS = ["node", "state", "pid", "role", "leader", "term", "index", "peers", "svc"]


def _status_rows(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Every node's status (asked in parallel) and the pid `kmctl up` recorded for it."""
    names = [n.name for n in cfg.nodes]
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        rows = list(pool.map(lambda name: _node_status(cfg, name), names))
    pids = supervisor.running(cfg)
    for row in rows:
        record = pids.get(row["node"])
        row["pid"] = record.pid if record else None
    return rows


def _exit_code(rows: list[dict[str, Any]]) -> int:
    """0 every node ready, 3 no node answers (as every command exits when none does), 1
    otherwise (some down or not ready)."""
    if rows and all(row["state"] == "down" for row in rows):
        return EXIT_FAILURE
    return EXIT_OK if all(row["state"] == "ready" for row in rows) else EXIT_REFUSED


def show_status(cfg: ClusterConfig, as_json: bool) -> int:
    """Print every node's status; return 0 if all are ready, 1 otherwise."""
    rows = _status_rows(cfg)
    if as_json:
        print_json({"cluster": cfg.cluster, "nodes": rows})
    else:
        print_table(f"cluster {cfg.cluster!r}", _STATUS_COLUMNS, [_status_row(row) for row in rows])
    return _exit_code(rows)


def _status_row(row: dict[str, Any]) -> list[Any]:
    status = row["status"]
    pid = row["pid"] if row["pid"] is not None else "-"
    if not isinstance(status, dict):
        return [row["node"], row["state"], pid, row["error"], "", "", "", "", ""]
    peers = status.get("peers") or {}
    attested = sum(1 for p in peers.values() if isinstance(p, dict) and p.get("attested"))
    service = status.get("service") or {}
    return [
        row["node"],
        row["state"],
        pid,
        status.get("role", "?"),
        status.get("leader") or "-",
        status.get("term", "?"),
        f"{status.get('commit', '?')}/{status.get('applied', '?')}",
        f"{attested}/{len(peers)}",
        "up" if isinstance(service, dict) and service.get("running") else "down",
    ]


def _status_table(cfg: ClusterConfig, rows: list[dict[str, Any]], caption: str) -> Table:
    table = Table(title=f"cluster {cfg.cluster!r}", title_justify="left", caption=caption)
    for column in _STATUS_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in _status_row(row)))
    return table


def watch_status(cfg: ClusterConfig, interval: float, count: int | None) -> int:
    """The status table, redrawn in place every ``interval`` seconds until Ctrl-C (or
    ``count`` refreshes); the exit code of the last refresh. Not on a terminal (a pipe, a
    log), each refresh is printed below the previous one instead."""
    console = Console()
    code = EXIT_OK
    with contextlib.ExitStack() as stack:
        live = None
        if console.is_terminal:
            live = stack.enter_context(Live(console=console, auto_refresh=False))
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the way out
            for done in itertools.count(1):
                started = time.monotonic()
                rows = _status_rows(cfg)
                code = _exit_code(rows)
                caption = f"{time.strftime('%H:%M:%S')}, every {interval:g}s; Ctrl-C stops"
                table = _status_table(cfg, rows, caption)
                if live is not None:
                    live.update(table, refresh=True)
                else:
                    console.print(table)
                if count is not None and done >= count:
                    break
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return code


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--watch", "-w", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
# For tests and scripts: stop after N refreshes.
@click.option("--count", type=click.IntRange(min=1), hidden=True)
@pass_context
def status(ctx: CliContext, as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Every node's view: ready or not, role, leader, term, commit/applied index, peers.

    Asks each node's /v1/status (unreachable nodes are shown as down). "index" is the commit
    and applied Raft index, "peers" how many peers the node has attested, "svc" whether its
    service enclave runs. Exits 0 if every node is ready, 1 if some are down or not ready,
    3 if no node answers
    (with --watch: as of the last refresh).

    \b
    Example: kmctl status --watch --interval 2
    """
    cfg = supervisor.effective_config(ctx.config())
    if watch and as_json:
        raise CliError("--watch draws a table for people; scripts poll `status --json`", EXIT_USAGE)
    if watch:
        raise click.exceptions.Exit(watch_status(cfg, interval, count))
    raise click.exceptions.Exit(show_status(cfg, as_json))


@click.group("node", cls=KmctlGroup)
def node() -> None:
    """Run one node in the foreground (what `kmctl up` starts for each node)."""


@node.command("run")
@click.argument("name")
@click.option(
    "--recover",
    is_flag=True,
    help="If the node's sealed state is lost, start in recovery mode (see `kmctl up --recover`).",
)
@pass_context
def run(ctx: CliContext, name: str, recover: bool) -> None:
    """Run node NAME of the cluster file until SIGTERM or SIGINT.

    The first node of the file, with an empty data directory, bootstraps a new cluster; any
    other node joins it. The exit code is the node's.

    \b
    Example: kmctl node run km1 -c cluster.yaml
    """
    cfg = ctx.config()
    try:
        cfg.node(name)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), EXIT_USAGE) from None
    if recover:
        click.echo(f"{name}: {supervisor.mark_for_recovery(cfg, name)}", err=True)
    # Imported here: the node pulls in the enclaves and Raft, which no other command needs.
    from kmnode.host.run import run_node

    raise click.exceptions.Exit(run_node(cfg, name))
