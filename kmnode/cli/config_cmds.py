"""`kmctl config ...`: check a cluster file and show what it describes."""

from __future__ import annotations

import click

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import KmctlGroup, print_json, print_table
from kmnode.config import config_to_yaml


@click.group(cls=KmctlGroup)
def config() -> None:
    """Validate and show the cluster configuration."""


@config.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the validated config as JSON.")
@pass_context
def check(ctx: CliContext, as_json: bool) -> None:
    """Validate the cluster file; list every problem with the path of the bad field.

    \b
    Example: kmctl config check -c cluster.yaml
    """
    cfg = ctx.config()
    if as_json:
        print_json(cfg.model_dump(mode="json"))
        return
    rows = [
        (n.name, n.host, n.peer_port, n.api_port, n.platform.id, n.platform.tcb.value)
        for n in cfg.nodes
    ]
    print_table(
        f"cluster {cfg.cluster!r}: {len(cfg.nodes)} nodes, state in {cfg.state_dir}",
        ["node", "host", "peer port", "api port", "platform", "TCB"],
        rows,
    )


@config.command("defaults")
@click.option("-n", "--nodes", default=3, show_default=True, type=click.IntRange(1, 64))
def defaults(nodes: int) -> None:
    """Print the embedded default cluster file (a starting point for your own).

    \b
    Example: kmctl config defaults -n 5 > cluster.yaml
    """
    from kmnode.config import ClusterConfig

    click.echo(config_to_yaml(ClusterConfig.default(nodes)), nl=False)
