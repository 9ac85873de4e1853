"""`kmctl chaos netns ...`: real IP-level partitions, each node in its own network namespace.

Where `kmctl chaos partition` asks the nodes' transports to drop what they send, these
commands make the Linux kernel drop the packets (kmnode.netns): `setup` builds a bridge
and one namespace per node (for a cluster file whose nodes have `netns` set, such as
docs/netns-cluster.yaml), `partition A B` adds blackhole routes between two namespaces, `heal`
removes them all, `teardown` removes everything. All of it needs root and iproute2.

The commands read the cluster file itself (not the effective config of a running cluster), so
`setup` builds namespaces for every node in it even when `kmctl up -n N` starts fewer. Exit
codes: 2 for a cluster file that cannot have namespaces or an unknown node, 1 when teardown
refuses because nodes still run inside, 3 when the machine refuses (not root, no `ip`, a
subnet already in use, an `ip` command failing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from kmnode import netns as ns
from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.config import ClusterConfig

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _topology(ctx: CliContext) -> tuple[ClusterConfig, ns.Topology]:
    """The cluster file and its namespace topology; a file that cannot have one is bad usage."""
    cfg = ctx.config()
    try:
        return cfg, ns.topology(cfg)
    except ns.NetnsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _machine(action: Callable[[], T]) -> T:
    """Run an action on the machine's network; its refusals are environment failures."""
    try:
        return action()
    except ns.NetnsError as exc:
        raise CliError(str(exc), EXIT_FAILURE) from None


def _show(status: ns.NetnsStatus, as_json: bool, headline: str) -> None:
    if as_json:
        print_json(status.to_dict())
        return
    bridge = "present" if status.bridge_exists else "absent"
    click.echo(f"{headline}: bridge {status.bridge} ({status.bridge_address}) {bridge}")
    rows = []
    for n in status.nodes:
        present = {"netns": n.netns_exists, "veth": n.veth_exists, "address": n.address_configured}
        missing = [what for what, there in present.items() if not there]
        if len(missing) == len(present):
            state = "absent"
        else:
            state = "missing " + ", ".join(missing) if missing else "ready"
        rows.append((n.node, n.netns, n.address, n.veth, state, ", ".join(n.blackholed) or "-"))
    print_table(
        f"cluster {status.cluster!r}: network namespaces",
        ["node", "netns", "address", "veth", "state", "cannot send to"],
        rows,
    )


@click.group("netns", cls=KmctlGroup)
def netns() -> None:
    """Real network partitions: each node in its own Linux network namespace (root only).

    For a cluster file whose nodes have `netns` and addresses on one /24 with the bridge at
    mqtt.embedded_host (see docs/netns-cluster.yaml and docs/chaos-netns.md):

    \b
      kmctl -c docs/netns-cluster.yaml chaos netns setup
      kmctl -c docs/netns-cluster.yaml up
      kmctl -c docs/netns-cluster.yaml chaos netns partition km1 km2
      kmctl -c docs/netns-cluster.yaml chaos netns heal
      kmctl -c docs/netns-cluster.yaml down
      kmctl -c docs/netns-cluster.yaml chaos netns teardown
    """


@netns.command("setup")
@_as_json
@pass_context
def setup(ctx: CliContext, as_json: bool) -> None:
    """Create the bridge, one namespace per node, veth pairs and addresses.

    Idempotent: what exists is kept, what is missing is added. Refuses a subnet that this
    machine already routes (pick another mqtt.embedded_host and node addresses then).

    \b
    Example: kmctl chaos netns setup -c cluster.yaml
    """
    cfg, _ = _topology(ctx)
    _show(_machine(lambda: ns.setup(cfg)), as_json, "set up")


@netns.command("teardown")
@click.option(
    "--force",
    is_flag=True,
    help="Even while nodes run inside (they are cut off from everything, but keep running).",
)
@_as_json
@pass_context
def teardown(ctx: CliContext, force: bool, as_json: bool) -> None:
    """Remove the namespaces, veth pairs and bridge; whatever is already gone is skipped.

    Run `kmctl down` first: a node whose namespace is removed keeps running, unreachable.

    \b
    Example: kmctl chaos netns teardown
    """
    cfg, topo = _topology(ctx)
    inside = {n.name for n in topo.nodes}
    alive = sorted(set(supervisor.running(supervisor.effective_config(cfg))) & inside)
    if alive and not force:
        raise CliError(
            f"{', '.join(alive)} still running in their namespaces: run `kmctl down` first "
            "(or teardown --force)",
            EXIT_REFUSED,
        )
    _show(_machine(lambda: ns.teardown(cfg)), as_json, "torn down")


@netns.command("partition")
@click.argument("a")
@click.argument("b")
@click.option(
    "--one-way",
    is_flag=True,
    help="Only A's packets to B are dropped (default: both directions). Over TCP this still "
    "stalls B's connections to A, whose answers are dropped.",
)
@_as_json
@pass_context
def partition(ctx: CliContext, a: str, b: str, one_way: bool, as_json: bool) -> None:
    """Cut A from B in the kernel: blackhole routes in the nodes' namespaces.

    Unlike `chaos partition`, the nodes are not told: their packets are dropped. Repeat for
    more pairs; `chaos netns heal` removes every cut.

    \b
    Example: kmctl chaos netns partition km1 km3
    """
    cfg, topo = _topology(ctx)
    if a == b:
        raise CliError(f"a partition needs two different nodes, not {a} and {b}", EXIT_USAGE)
    try:
        for name in (a, b):
            topo.node(name)
    except ns.NetnsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    cut = _machine(lambda: ns.partition(cfg, a, b, one_way=one_way))
    if as_json:
        print_json({"partitioned": [list(p) for p in cut]})
    else:
        arrow = "->" if one_way else "<->"
        click.echo(f"partitioned {a} {arrow} {b} (blackhole routes)")


@netns.command("heal")
@_as_json
@pass_context
def heal(ctx: CliContext, as_json: bool) -> None:
    """Remove every blackhole route in the cluster's namespaces.

    \b
    Example: kmctl chaos netns heal
    """
    cfg, _ = _topology(ctx)

    def run() -> list[tuple[str, str]]:
        before = ns.status(cfg).partitions()
        ns.heal(cfg)
        return before

    healed = _machine(run)
    if as_json:
        print_json({"healed": [list(p) for p in healed]})
    elif healed:
        click.echo("healed " + ", ".join(f"{a} -> {b}" for a, b in healed))
    else:
        click.echo("nothing to heal: no blackhole routes")


@netns.command("status")
@_as_json
@pass_context
def status(ctx: CliContext, as_json: bool) -> None:
    """What exists of the topology, and which node cannot send to which.

    \b
    Example: kmctl chaos netns status --json
    """
    cfg, _ = _topology(ctx)
    _show(_machine(lambda: ns.status(cfg)), as_json, "status")
