"""kmctl: the operator CLI, noun-verb commands in the style of `vault operator raft ...`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from kmnode.cli.attest_cmds import attest
from kmnode.cli.audit_cmds import audit
from kmnode.cli.chaos_cmds import chaos
from kmnode.cli.cluster_cmds import down, node, status, up
from kmnode.cli.config_cmds import config
from kmnode.cli.context import CliContext
from kmnode.cli.contracts_cmds import contracts
from kmnode.cli.dashboard_cmds import dashboard
from kmnode.cli.data_cmds import data
from kmnode.cli.deploy_cmds import deploy
from kmnode.cli.events_cmds import events
from kmnode.cli.governance_cmds import proposals
from kmnode.cli.hardware_cmds import hardware
from kmnode.cli.identity_cmds import identity as identity_group
from kmnode.cli.ledger_cmds import ledger
from kmnode.cli.ops_cmds import keys, members, policy, prove, releases
from kmnode.cli.output import KmctlGroup
from kmnode.cli.recovery_cmds import recovery
from kmnode.cli.snapshot_cmds import snapshot


@click.group(
    cls=KmctlGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="KMSIM_CONFIG",
    help="Cluster file. Default: ./cluster.yaml if present, else the embedded 3-node defaults.",
)
@click.option(
    "--as",
    "identity",
    metavar="NAME|FILE",
    envvar="KMSIM_IDENTITY",
    help="Identity whose key signs API requests: a key file, or NAME.key in $KMSIM_IDENTITY_DIR "
    "(default ~/.kmsim/identities) or the state directory. Default: the development profile's "
    "admin key, if `kmctl up` made one. [env: KMSIM_IDENTITY]",
)
@click.version_option(package_name="kmsim")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, identity: str | None) -> None:
    """Operate a key-management cluster of (simulated) TEE nodes.

    KM enclaves attest each other with signed quotes, agree through Raft, and release keys only
    to locally attested service enclaves. The TEE hardware is simulated with real cryptography.

    Exit codes: 0 ok, 1 refused by a check or the cluster, 2 bad usage or configuration,
    3 internal or environment failure.
    """
    if identity:
        # Library code below the CLI (chaos runs, faults) signs as KMSIM_IDENTITY: the same
        # identity for this command, and only for it.
        previous = os.environ.get("KMSIM_IDENTITY")
        os.environ["KMSIM_IDENTITY"] = identity
        ctx.call_on_close(lambda: _restore("KMSIM_IDENTITY", previous))
    ctx.obj = CliContext(config_path, identity)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


for command in (
    up, down, status, node, keys, releases, prove, policy, members, attest, ledger, identity_group,
    proposals, contracts, data, recovery, snapshot, hardware, audit,
):  # fmt: skip
    cli.add_command(command)
cli.add_command(events)
cli.add_command(chaos)
cli.add_command(config)
cli.add_command(dashboard)
cli.add_command(deploy)


def main() -> None:
    cli(prog_name="kmctl")
