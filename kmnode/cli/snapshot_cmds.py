"""`kmctl snapshot save|restore`: backups of a cluster's replicated state.

A snapshot is the KM state at one ledger position, signed by the enclave of the node that took
it (``kmnode.km.snapshot_source``). It holds no secret: keys are derived from the master
secret, which comes back through recovery shares after a restore. `save` reads it in chunks
and checks it before the file appears; `restore` checks it again and seeds empty node
directories, whose enclaves check it a third time before their Raft log starts from it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import click

from attest.quote import QuoteVerifier
from consensus.fileio import atomic_write
from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.options import trust_km_option
from kmnode.cli.output import EXIT_REFUSED, EXIT_USAGE, CliError, KmctlGroup, print_json
from kmnode.config import ClusterConfig
from kmnode.datadir import RAFT_DIR, RECOVER_MARKER, RESTORE_SNAPSHOT
from kmnode.enclave_code import current_measurements
from kmnode.km.ledger_proof import SignedSnapshot
from kmnode.km.state import KMState
from kmnode.ledger.replay import judge_snapshot
from kmnode.simhw import HardwareStore

#: The most chunks a save reads (a state of 64 GiB): the loop is bounded whatever a node says.
MAX_CHUNKS = 1 << 18


@click.group(cls=KmctlGroup)
def snapshot() -> None:
    """Backups: save a signed snapshot of the cluster's state, restore it onto fresh nodes."""


def _judged(
    cfg: ClusterConfig, data: bytes, trust_km: tuple[bytes, ...]
) -> tuple[SignedSnapshot, KMState]:
    """The snapshot and its state if a member's enclave of a build we trust signed exactly it."""
    verifier = QuoteVerifier(HardwareStore(cfg.state_dir / "hardware").vendor_public_key())
    trusted = cfg.policy.resolve(current_measurements()).km_measurements | set(trust_km)
    judged = judge_snapshot(data, verifier, frozenset(trusted))
    if isinstance(judged, str):
        raise CliError(f"the snapshot is {judged}", EXIT_REFUSED)
    return judged


@snapshot.command("save")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_api_node
@trust_km_option
@_as_json
@pass_context
def save(
    ctx: CliContext,
    file: Path,
    api_node: str | None,
    trust_km: tuple[bytes, ...],
    as_json: bool,
) -> None:
    """Save a signed snapshot of the cluster's state (as one node holds it) to FILE.

    Read in chunks, checked (digest, the enclave's signature, its quote under the vendor root)
    and only then written, with mode 0600; an existing FILE is not overwritten. The snapshot
    holds no secret; restore it with `kmctl snapshot restore`.

    \b
    Example: kmctl snapshot save backup.snap --node km2
    """
    if file.exists():
        raise CliError(f"{file} exists: not overwriting it", EXIT_USAGE)
    cfg = supervisor.effective_config(ctx.config())
    client = ctx.client(api_node)
    first = client.get("/v1/snapshot")
    snapshot_id, size = str(first["id"]), int(first["size"])
    parts = [base64.b64decode(first["chunk"])]
    got = len(parts[0])
    for _ in range(MAX_CHUNKS):
        if got >= size:
            break
        answer = client.get("/v1/snapshot", {"offset": str(got), "id": snapshot_id})
        part = base64.b64decode(answer["chunk"])
        if not part:
            raise CliError(f"the node sent no bytes at offset {got} of {size}", EXIT_REFUSED)
        parts.append(part)
        got += len(part)
    data = b"".join(parts)
    if len(data) != size or hashlib.sha256(data).hexdigest() != snapshot_id:
        raise CliError("the snapshot read does not match its digest: not saved", EXIT_REFUSED)
    signed, state = _judged(cfg, data, trust_km)
    atomic_write(file, data)
    summary = {
        "file": str(file),
        "node": first.get("node"),
        "index": signed.index,
        "term": signed.term,
        "bytes": size,
        "chunks": len(parts),
        "cluster": state.cluster,
        "keys": len(state.keys),
        "members": sorted(state.members),
    }
    if as_json:
        print_json(summary)
        return
    click.echo(
        f"saved {file}: cluster {state.cluster!r} at index {signed.index} (term {signed.term}) "
        f"from {first.get('node')}, {size} bytes in {len(parts)} chunks, {len(state.keys)} keys; "
        "signature and quote verified"
    )


@snapshot.command("restore")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NAME",
    help="A node to seed (repeatable). Default: every node of the cluster file.",
)
@trust_km_option
@pass_context
def restore(
    ctx: CliContext, file: Path, nodes: tuple[str, ...], trust_km: tuple[bytes, ...]
) -> None:
    """Seed empty node directories with the snapshot in FILE.

    Checks the snapshot first (the enclave's signature, its quote under the vendor root, a KM
    build cluster.yaml trusts), refuses a running node or one that has a Raft log, and leaves
    the snapshot for the node's enclave, which checks it again and starts its log from it.
    The nodes then start in recovery mode: `kmctl up --recover`, and the recovery holders run
    `kmctl recovery submit`.

    \b
    Example: kmctl snapshot restore backup.snap
    """
    cfg = ctx.config()
    data = file.read_bytes()
    signed, state = _judged(cfg, data, trust_km)
    names = list(nodes) or [n.name for n in cfg.nodes]
    running = supervisor.running(cfg)
    for name in names:
        try:
            cfg.node(name)
        except KeyError as exc:
            raise CliError(str(exc.args[0]), EXIT_USAGE) from None
        if name not in state.members:
            raise CliError(f"the snapshot's cluster has no member {name!r}", EXIT_REFUSED)
        if name in running:
            raise CliError(f"{name} is running: stop it first (kmctl down)", EXIT_REFUSED)
        raft_dir = supervisor.node_data_dir(cfg, name) / RAFT_DIR
        if raft_dir.is_dir() and any(raft_dir.iterdir()):
            raise CliError(
                f"{name} has a Raft log in {raft_dir}: a snapshot seeds only an empty "
                "directory (move the old one aside first)",
                EXIT_REFUSED,
            )
    for name in names:
        directory = supervisor.node_data_dir(cfg, name)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(directory / RESTORE_SNAPSHOT, data)
        (directory / RECOVER_MARKER).write_text("recover: restored from a snapshot\n")
        click.echo(f"{name}: seeded with the snapshot at index {signed.index}")
    click.echo(
        "next: kmctl up --recover, then each recovery holder: kmctl recovery submit --as NAME"
    )
