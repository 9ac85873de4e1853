"""`kmctl ledger ...`: check and read a stopped node's ledger offline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import EXIT_REFUSED, CliError, KmctlGroup, print_json, print_table
from kmnode.config import ClusterConfig
from kmnode.ledger import committed_commands, read_ledger, verify_node
from kmnode.simhw import HardwareStore


def _raft_dir(cfg: ClusterConfig, node: str, force: bool) -> Path:
    try:
        cfg.node(node)
    except KeyError as exc:
        raise CliError(str(exc.args[0])) from None
    path = cfg.state_dir / "nodes" / node / "raft"
    if not path.is_dir():
        raise CliError(f"{node} has no ledger at {path}")
    if node in supervisor.running(cfg) and not force:
        raise CliError(f"{node} is running; stop it first (kmctl down) or pass --force")
    return path


@click.group(cls=KmctlGroup)
def ledger() -> None:
    """Offline checks of a node's ledger (its Raft log): hash chain and enclave signatures."""


@ledger.command("verify")
@click.argument("node")
@click.option("--force", is_flag=True, help="Verify even if the node is running.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def verify(ctx: CliContext, node: str, force: bool, as_json: bool) -> None:
    """Replay NODE's ledger, recompute its hash chain and check every signature of the leader's
    enclave against the vendor root. Names the first bad entry; exits 1 if any check fails."""
    cfg = ctx.config()
    raft_dir = _raft_dir(cfg, node, force)
    references = [
        cfg.state_dir / "nodes" / other.name / "raft"
        for other in cfg.nodes
        if other.name != node and (cfg.state_dir / "nodes" / other.name / "raft").is_dir()
    ]
    vendor_root = HardwareStore(cfg.state_dir / "hardware").vendor_public_key()
    report = verify_node(raft_dir, vendor_root, references)
    if as_json:
        print_json({"node": node, **report.as_dict()})
    else:
        verdict = "OK" if report.ok else "BAD"
        rows = [
            ("verdict", verdict),
            ("commands", f"{report.commands} (indexes {report.first_index}..{report.last_index})"),
            ("signatures verified", report.signatures),
            ("signed through index", report.last_signed_index),
        ]
        if report.problem:
            rows.append(("problem", report.problem))
        if report.first_bad_index is not None:
            rows.append(("first bad entry", report.first_bad_index))
        elif report.bad_range is not None:
            rows.append(
                ("bad entry within", f"indexes {report.bad_range[0] + 1}..{report.bad_range[1]}")
            )
        rows += [("note", note) for note in report.notes]
        print_table(f"ledger of {node}", ["", ""], rows)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_REFUSED)


@ledger.command("dump")
@click.argument("node")
@click.option("--force", is_flag=True, help="Read even if the node is running.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_context
def dump(ctx: CliContext, node: str, force: bool, limit: int, as_json: bool) -> None:
    """Show the last committed commands of NODE's ledger (they hold no key material)."""
    cfg = ctx.config()
    entries = committed_commands(read_ledger(_raft_dir(cfg, node, force)))[-limit:]
    rows = []
    for entry in entries:
        try:
            command = json.loads(entry.data)
        except ValueError:
            command = {"op": "<not JSON>"}
        if as_json:
            click.echo(json.dumps({"index": entry.index, "term": entry.term, "command": command}))
        else:
            op = command.get("op", "?") if isinstance(command, dict) else "?"
            rows.append((entry.index, entry.term, op, entry.data.decode("utf-8", "replace")[:80]))
    if not as_json:
        print_table(
            f"ledger of {node}: last {len(rows)} commands", ["index", "term", "op", "command"], rows
        )
