"""`kmctl hardware ...`: the simulated hardware vendor, shared between machines.

Each machine's state directory holds its simulated hardware (``<state_dir>/hardware``): the
vendor root that certifies platforms, and each platform's fused secrets. Nodes on different
machines trust each other's quotes only if one vendor root certified both platforms, as Intel's
root certifies every SGX CPU: export the root on one machine, import it on the others. Platform
secrets never leave their machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from consensus.fileio import write_new
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import EXIT_REFUSED, EXIT_USAGE, CliError, KmctlGroup, print_json
from kmnode.simhw import HardwareStore, HardwareStoreError


@click.group(cls=KmctlGroup)
def hardware() -> None:
    """The simulated hardware vendor root: show it, export it, import it on another machine
    so nodes with separate state directories trust the same vendor."""


def _store(ctx: CliContext) -> HardwareStore:
    return HardwareStore(ctx.config().state_dir / "hardware")


@hardware.command("show")
@_as_json
@pass_context
def show(ctx: CliContext, as_json: bool) -> None:
    """The vendor root this machine's platforms are certified by (compare it across
    machines), and the platforms whose secrets live here.

    \b
    Example: kmctl hardware show --json
    """
    store = _store(ctx)
    try:
        public = store.vendor_public_key().hex()
    except HardwareStoreError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    platforms = sorted(p.stem for p in (store.root / "platforms").glob("*.seed"))
    view = {"store": str(store.root), "vendor_root": public, "platforms": platforms}
    if as_json:
        print_json(view)
        return
    fingerprint = hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16]
    click.echo(f"vendor root {public} (fingerprint {fingerprint}) in {store.root}")
    click.echo(f"platforms here: {', '.join(platforms) or 'none yet'}")


@hardware.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@pass_context
def export(ctx: CliContext, file: Path) -> None:
    """Write this machine's simulated vendor root to FILE (mode 0600; it is the vendor's
    signing secret: copy it to the other machines over a channel you trust, then delete it).

    \b
    Example: kmctl hardware export vendor.json && scp vendor.json host2: && rm vendor.json
    """
    if file.exists():
        raise CliError(f"{file} exists: not overwriting it", EXIT_USAGE)
    try:
        document = _store(ctx).export_vendor()
    except HardwareStoreError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    try:
        write_new(file, document)
    except FileExistsError:
        raise CliError(f"{file} exists: not overwriting it", EXIT_USAGE) from None
    click.echo(f"wrote the vendor root to {file}; import it with: kmctl hardware import {file}")


@hardware.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--replace",
    is_flag=True,
    help="Replace a different vendor root this machine already has (its platforms' "
    "certificates change: clusters that trusted the old root stop trusting them).",
)
@pass_context
def import_(ctx: CliContext, file: Path, replace: bool) -> None:
    """Trust the vendor root exported on another machine: this machine's platforms are then
    certified by it, so nodes here and there accept each other's quotes.

    \b
    Example: kmctl hardware import vendor.json -c cluster.yaml
    """
    try:
        click.echo(_store(ctx).import_vendor(file.read_bytes(), replace=replace))
    except HardwareStoreError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
