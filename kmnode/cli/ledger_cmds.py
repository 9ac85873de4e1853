"""`kmctl ledger ...`: check and read a stopped node's ledger offline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import trust_km_option
from kmnode.cli.output import EXIT_REFUSED, CliError, KmctlGroup, print_json, print_table
from kmnode.config import ClusterConfig
from kmnode.enclave_code import current_measurements
from kmnode.ledger import (
    LedgerMark,
    LedgerReport,
    committed_commands,
    node_mark,
    read_ledger,
    verify_node,
)
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
    """Offline checks of a node's ledger (its Raft log): hash chain, enclave signatures, and
    comparison with another ledger's signed mark."""


_TAIL_HELP = (
    "Accept the commands after the last signature. Why one exists: the leader's enclave signs "
    "every ledger.sign_every_entries commands or ledger.sign_interval_s seconds, so a node "
    "stopped in between holds the entries since the last signature interval, which nobody has "
    "signed yet; a host could also have appended them, hence refused by default."
)
_AGAINST_HELP = (
    "Compare with another ledger's signed high-water mark: a node's name (its ledger is "
    "verified and its highest member-signed index taken) or a file from `kmctl ledger mark`. "
    "A ledger ending before the mark (truncated, an older copy, or a node that was stopped "
    "behind) or holding another chain at the mark's index (rolled back) is refused."
)


def _vendor_root(cfg: ClusterConfig) -> bytes:
    return HardwareStore(cfg.state_dir / "hardware").vendor_public_key()


def _mark_of(cfg: ClusterConfig, reference: str, force: bool) -> LedgerMark:
    """The mark ``--against`` names: a configured node's ledger, else a mark file."""
    if reference in {n.name for n in cfg.nodes}:
        raft_dir = _raft_dir(cfg, reference, force)
        return node_mark(raft_dir, _vendor_root(cfg), reference)
    path = Path(reference)
    if not path.is_file():
        raise CliError(f"--against {reference}: neither a node of this cluster nor a file")
    return LedgerMark.load(path)


@ledger.command("verify")
@click.argument("node")
@click.option("--force", is_flag=True, help="Verify even if the node is running.")
@click.option("--allow-unsigned-tail", is_flag=True, help=_TAIL_HELP)
@click.option("--against", "against", metavar="NODE|FILE", help=_AGAINST_HELP)
@trust_km_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def verify(
    ctx: CliContext,
    node: str,
    force: bool,
    allow_unsigned_tail: bool,
    against: str | None,
    trust_km: tuple[bytes, ...],
    as_json: bool,
) -> None:
    """Replay NODE's ledger, check its snapshot's signature, recompute its hash chain and
    check every signature of a member's enclave against the vendor root. Names the first bad
    entry; exits 1 if any check fails (an unsigned tail too, unless allowed).

    \b
    Example: kmctl ledger verify km3
    Example: kmctl ledger verify km3 --against km1.mark
    """
    cfg = ctx.config()
    raft_dir = _raft_dir(cfg, node, force)
    references = [
        cfg.state_dir / "nodes" / other.name / "raft"
        for other in cfg.nodes
        if other.name != node and (cfg.state_dir / "nodes" / other.name / "raft").is_dir()
    ]
    mark = _mark_of(cfg, against, force) if against else None
    # A snapshot names its own members and policy: what anchors it is the operator's trust.
    trusted = cfg.policy.resolve(current_measurements()).km_measurements | set(trust_km)
    report = verify_node(
        raft_dir,
        _vendor_root(cfg),
        references,
        against=mark,
        allow_unsigned_tail=allow_unsigned_tail,
        trusted_km=frozenset(trusted),
    )
    if as_json:
        print_json({"node": node, "against": against, **report.as_dict()})
    else:
        _print_report(node, report)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_REFUSED)


def _print_report(node: str, report: LedgerReport) -> None:
    verdict = "OK" if report.ok else "BAD"
    rows: list[tuple[str, object]] = [
        ("verdict", verdict),
        ("commands", f"{report.commands} (indexes {report.first_index}..{report.last_index})"),
        ("signatures verified", report.signatures),
        ("signed through index", report.last_signed_index),
        ("unsigned tail", report.unsigned_tail),
    ]
    if report.snapshot_index:
        rows.append(("signed snapshot at", report.snapshot_index))
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


@ledger.command("mark")
@click.argument("node")
@click.option("--force", is_flag=True, help="Read even if the node is running.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the mark to this file (default: standard output).",
)
@pass_context
def mark(ctx: CliContext, node: str, force: bool, output: Path | None) -> None:
    """Write NODE's signed high-water mark: the highest (index, chain hash) a member's enclave
    signed in its ledger, with the quote and signature, for `ledger verify --against FILE`
    later or on another machine. Exits 1 if NODE's ledger does not verify.

    \b
    Example: kmctl ledger mark km1 --force -o km1.mark
    """
    cfg = ctx.config()
    found = node_mark(_raft_dir(cfg, node, force), _vendor_root(cfg), node)
    text = json.dumps(found.to_json(), indent=2, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text)
    click.echo(f"{node}: signed mark at index {found.index} written to {output}", err=True)


@ledger.command("dump")
@click.argument("node")
@click.option("--force", is_flag=True, help="Read even if the node is running.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_context
def dump(ctx: CliContext, node: str, force: bool, limit: int, as_json: bool) -> None:
    """Show the last committed commands of NODE's ledger (they hold no key material).

    \b
    Example: kmctl ledger dump km2 --force --limit 20
    """
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
