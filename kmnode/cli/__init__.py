"""kmctl: the operator CLI, noun-verb commands in the style of `vault operator raft ...`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from kmnode.cli.attest_cmds import attest
from kmnode.cli.audit_cmds import audit
from kmnode.cli.chaos_cmds import chaos
from kmnode.cli.cluster_cmds import down, node, status, up
from kmnode.cli.completion_cmds import complete_node, completion
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
from kmnode.cli.output import OUTPUT_MODES, OUTPUT_VARIABLE, KmctlGroup
from kmnode.cli.recovery_cmds import recovery
from kmnode.cli.snapshot_cmds import snapshot

#: The global options that may also be typed after the command (`kmctl up -c FILE`).
_HOISTED = ("-c", "--config")


class KmctlRoot(KmctlGroup):
    """kmctl itself: ``-c/--config FILE`` is taken wherever it is typed, before the command
    or after it (``kmctl node run km1 -c cluster.yaml``, as a container's command line reads),
    by moving it to the front before click parses; ``--`` ends the search."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_config(args))


def hoist_config(args: list[str]) -> list[str]:
    """``args`` with every ``-c FILE``, ``--config FILE`` or ``--config=FILE`` found after the
    command moved before it (the last one typed wins, as click's own rule is)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in _HOISTED and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 2
            continue
        if arg.startswith("--config="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


@click.group(
    cls=KmctlRoot,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        # Every option has a KMSIM_* twin (KMSIM_<COMMAND>_<OPTION>), shown in --help.
        "auto_envvar_prefix": "KMSIM",
        "show_default": False,
    },
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="KMSIM_CONFIG",
    show_envvar=True,
    help="Cluster file; may also follow the command. Default: ./cluster.yaml if present, "
    "else the embedded 3-node defaults (kmctl says so on stderr).",
)
@click.option(
    "--as",
    "identity",
    metavar="NAME|FILE",
    envvar="KMSIM_IDENTITY",
    help="Identity whose key signs API requests: a key file, or NAME.key in $KMSIM_IDENTITY_DIR "
    "(default ~/.kmsim/identities) or the state directory. Default: the development profile's "
    "admin key, if `kmctl up` made one.",
    show_envvar=True,
)
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    metavar="URL",
    envvar="KMSIM_ENDPOINTS",
    show_envvar=True,
    help="A node's API URL (http://HOST:PORT), repeatable or comma-separated: reach a cluster "
    "without its file; the leader is found and followed as usual.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(OUTPUT_MODES),
    envvar=OUTPUT_VARIABLE,
    show_envvar=True,
    help="How reads print: table (for people), plain (tab-separated, no boxes, no wrapping), "
    "json (as --json), auto (default: table on a terminal, plain into a pipe or a file).",
)
@click.version_option(package_name="kmsim")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    identity: str | None,
    endpoints: tuple[str, ...],
    output: str | None,
) -> None:
    """Operate a key-management cluster of (simulated) TEE nodes.

    KM enclaves attest each other with signed quotes, agree through Raft, and release keys only
    to locally attested service enclaves. The TEE hardware is simulated with real cryptography.

    Exit codes: 0 ok, 1 refused by a check or the cluster, 2 bad usage or configuration,
    3 internal or environment failure.
    """
    if output is not None:
        # Read by the tables (``table_mode``) and, for json, by every command's --json flag,
        # whose variable is KMSIM_JSON: the subcommand's options are parsed after this runs.
        _set_for_this_command(ctx, OUTPUT_VARIABLE, output)
        if output == "json":
            _set_for_this_command(ctx, "KMSIM_JSON", "1")
    for stray, meant in _MISNAMED.items():
        if stray in os.environ and meant not in os.environ:
            click.echo(f"kmctl: {stray} is not read: the variable is {meant}", err=True)
    if identity:
        # Library code below the CLI (chaos runs, faults) signs as KMSIM_IDENTITY: the same
        # identity for this command, and only for it.
        _set_for_this_command(ctx, "KMSIM_IDENTITY", identity)
    urls = tuple(u.strip() for value in endpoints for u in value.replace(",", " ").split())
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"{url!r} is not an http(s):// URL", param_hint="--endpoint")
    ctx.obj = CliContext(config_path, identity, endpoints=urls)


#: Variables people type by analogy (etcdctl's ETCDCTL_*) that kmctl does not read.
_MISNAMED = {
    "KMCTL_CONFIG": "KMSIM_CONFIG",
    "KMCTL_IDENTITY": "KMSIM_IDENTITY",
    "KMCTL_ENDPOINTS": "KMSIM_ENDPOINTS",
}


def _set_for_this_command(ctx: click.Context, name: str, value: str) -> None:
    """Set an environment variable for this invocation only (restored when it ends)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    ctx.call_on_close(lambda: _restore(name, previous))


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


for command in (
    up, down, status, node, keys, releases, prove, policy, members, attest, ledger, identity_group,
    proposals, contracts, data, recovery, snapshot, hardware, audit, completion,
):  # fmt: skip
    cli.add_command(command)
cli.add_command(events)
cli.add_command(chaos)
cli.add_command(config)
cli.add_command(dashboard)
cli.add_command(deploy)


#: Parameters that take a node's name: the shell completes them from the cluster file.
_NODE_PARAMS = frozenset({"api_node", "target", "node", "nodes", "to"})
#: Options every command means alike read one variable wherever they appear.
_SHARED_VARIABLES = {"as_json": "KMSIM_JSON", "api_node": "KMSIM_NODE"}


def _show_envvars(command: click.Command) -> None:
    """Have every option's ``--help`` line name its KMSIM_* variable (KMSIM_JSON and
    KMSIM_NODE for the shared ones, else KMSIM_<COMMAND>_<OPTION>)."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            param.show_envvar = True
            if param.envvar is None and param.name in _SHARED_VARIABLES:
                param.envvar = _SHARED_VARIABLES[param.name]
        if param.name in _NODE_PARAMS and param._custom_shell_complete is None:
            param._custom_shell_complete = complete_node
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _show_envvars(sub)


_show_envvars(cli)


def main() -> None:
    cli(prog_name="kmctl")
