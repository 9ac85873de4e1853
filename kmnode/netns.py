"""Real network partitions on one Linux machine: each node in its own network namespace.

The link faults of ``kmctl chaos partition`` are rules inside the nodes' own transports; they
cannot show what a kernel that drops packets does to timeouts, half-open connections and
reconnects. This module builds the topology that can: a Linux bridge in the machine's own
(root) namespace holding ``mqtt.embedded_host``/24, and for every node with ``netns`` set a
namespace of that name joined to the bridge by a veth pair, with the node's ``host`` as its
address. A partition is then a ``blackhole`` route in a node's namespace: its packets to the
other node are dropped by the kernel, exactly as a cut cable would lose them.

One job only: the topology. Everything that decides what to run is a pure function returning
``ip`` argv lists (``setup_commands``, ``partition_commands`` ...) or parsing ``ip -j`` output,
so it is unit-tested without root; the thin runners (``setup``, ``teardown``, ``partition``,
``heal``, ``status``) observe the current state, run the commands and report. They are
idempotent, and teardown never fails on something already gone.

Safety: the only addresses ever configured or targeted are the bridge address and the nodes'
addresses, all inside one private /24 that must not overlap any route the machine already has,
and blackhole routes are only added or removed inside the cluster's own namespaces. Interface
names carry a hash of the cluster (and node) name, so parallel clusters never share one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmnode.config import ClusterConfig, NodeSpec

#: The name of a node's end of its veth pair, inside its namespace.
NS_IFNAME = "eth0"
#: Every netns topology is one /24: the bridge address and the nodes' addresses.
PREFIX_LEN = 24
#: Linux interface names are at most IFNAMSIZ - 1 = 15 bytes.
IFNAME_MAX = 15
#: Prefixes of the interfaces this module creates (bridge, host ends of the veth pairs).
BRIDGE_PREFIX = "kmb"
VETH_PREFIX = "kmv"
#: Where iproute2 lives when a non-root PATH lacks the sbin directories.
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
_IP_TIMEOUT = 15.0
#: ``ip`` errors that mean "already gone": teardown and heal treat them as done.
_GONE = ("Cannot find device", "No such file or directory", "No such process")
#: Docs an error message can point at.
_DOC = "docs/chaos-netns.md"
#: Bridged frames skip the host firewall (on machines with Docker it drops forwarded traffic by
#: default); our partitions are routes, never firewall rules.
_BRIDGE_NO_FIREWALL = ("nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0")
_BLACKHOLES = ("type", "blackhole")


class NetnsError(Exception):
    """The topology cannot be built, changed or inspected; the message says why and what to do."""


# --- names and the topology (pure) ------------------------------------------------------------


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:6]


def bridge_name(cluster: str) -> str:
    """The bridge of ``cluster``: ``kmb<hash>-<cluster>`` cut to 15 characters. The hash keeps
    two clusters (parallel test runs) apart; the readable tail is for ``ip link`` readers."""
    return f"{BRIDGE_PREFIX}{_short_hash('bridge', cluster)}-{cluster}"[:IFNAME_MAX]


def veth_name(cluster: str, node: str) -> str:
    """The root-namespace end of ``node``'s veth pair (the other end is ``eth0`` inside the
    node's namespace, created there directly, so it never clashes with anything)."""
    return f"{VETH_PREFIX}{_short_hash('veth', cluster, node)}-{node}"[:IFNAME_MAX]


@dataclass(frozen=True)
class NsNode:
    """One node's place in the topology."""

    name: str
    netns: str
    address: ipaddress.IPv4Address
    veth: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{PREFIX_LEN}"


@dataclass(frozen=True)
class Topology:
    """What ``setup`` builds for a cluster: derived from the config alone, validated."""

    cluster: str
    bridge: str
    bridge_address: ipaddress.IPv4Interface
    nodes: tuple[NsNode, ...]

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.bridge_address.network

    @property
    def bridge_cidr(self) -> str:
        return str(self.bridge_address)

    def node(self, name: str) -> NsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise NetnsError(
            f"no node named {name!r} runs in a network namespace in cluster "
            f"{self.cluster!r} (nodes with netns: {known})"
        )

    def by_address(self) -> dict[str, str]:
        return {str(n.address): n.name for n in self.nodes}


def _is_usable_private(address: ipaddress.IPv4Address) -> bool:
    return address.is_private and not (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def topology(cfg: ClusterConfig) -> Topology:
    """The topology of ``cfg``'s nodes that have ``netns`` set; NetnsError naming the field
    that makes it unbuildable. Config validation already refuses most of this; this repeats
    what ``setup`` relies on, since a ClusterConfig can be built without that validation."""
    in_netns = [(i, n) for i, n in enumerate(cfg.nodes) if n.netns is not None]
    if not in_netns:
        raise NetnsError(
            f"no node of cluster {cfg.cluster!r} has `netns` set, so there is no namespace to "
            f"manage; use a cluster file like docs/netns-cluster.yaml (see {_DOC})"
        )
    try:
        bridge_ip = ipaddress.IPv4Address(cfg.mqtt.embedded_host)
    except ValueError:
        raise NetnsError(
            f"mqtt.embedded_host: {cfg.mqtt.embedded_host!r} is not an IPv4 address; it is the "
            "bridge address of the namespaces (e.g. 10.77.0.1)"
        ) from None
    if not _is_usable_private(bridge_ip):
        raise NetnsError(
            f"mqtt.embedded_host: {bridge_ip} cannot be the namespaces' bridge address: it must "
            "be a private unicast address such as 10.77.0.1 (never loopback, link-local or "
            "public)"
        )
    bridge = ipaddress.IPv4Interface(f"{bridge_ip}/{PREFIX_LEN}")
    subnet = bridge.network
    if bridge_ip in (subnet.network_address, subnet.broadcast_address):
        raise NetnsError(
            f"mqtt.embedded_host: {bridge_ip} is the network or broadcast address of {subnet}"
        )
    nodes: list[NsNode] = []
    owners: dict[str, str] = {}
    taken: dict[ipaddress.IPv4Address, str] = {bridge_ip: "mqtt.embedded_host (the bridge)"}
    for i, spec in in_netns:
        assert spec.netns is not None
        where = f"nodes[{i}]"
        if spec.netns in owners:
            raise NetnsError(
                f"{where}.netns: {spec.netns!r} is also the namespace of {owners[spec.netns]} "
                "(one namespace per node)"
            )
        owners[spec.netns] = where
        try:
            address = ipaddress.IPv4Address(spec.host)
        except ValueError:
            raise NetnsError(
                f"{where}.host: {spec.host!r} is not an IPv4 address; a node in namespace "
                f"{spec.netns!r} needs an address in {subnet}"
            ) from None
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise NetnsError(
                f"{where}.host: {address} is outside the bridge subnet {subnet} (from "
                f"mqtt.embedded_host {bridge_ip}); nodes in namespaces need an address in it, "
                f"e.g. {subnet.network_address + 11 + i}"
            )
        if address in taken:
            raise NetnsError(f"{where}.host: {address} is also {taken[address]}")
        taken[address] = f"{where}.host"
        nodes.append(NsNode(spec.name, spec.netns, address, veth_name(cfg.cluster, spec.name)))
    not_in = [f"nodes[{i}]" for i, n in enumerate(cfg.nodes) if n.netns is None]
    if not_in:
        raise NetnsError(
            f"{', '.join(not_in)}: no netns set while other nodes have one; either every node "
            "runs in its own namespace or none does"
        )
    return Topology(cfg.cluster, bridge_name(cfg.cluster), bridge, tuple(nodes))


# --- running inside a namespace (pure) ---------------------------------------------------------


def exec_argv(netns: str, argv: Sequence[str], ip: str = "ip") -> list[str]:
    """``argv`` run inside ``netns``. ``ip netns exec`` execs ``argv`` in place (no fork), so
    the process keeps its pid and /proc soon shows ``argv`` itself: see :func:`unwrap_exec`."""
    return [ip, "netns", "exec", netns, *argv]


def unwrap_exec(argv: Sequence[str]) -> list[str]:
    """The command an :func:`exec_argv` list ends up running (what /proc/PID/cmdline shows once
    ``ip`` has exec'd it); any other argv unchanged."""
    if len(argv) > 4 and Path(argv[0]).name == "ip" and list(argv[1:3]) == ["netns", "exec"]:
        return list(argv[4:])
    return list(argv)


def node_argv(node: NodeSpec, argv: Sequence[str], ip: str = "ip") -> list[str]:
    """``argv`` as ``node`` must run it: inside its namespace if it has one, else unchanged."""
    return exec_argv(node.netns, argv, ip) if node.netns is not None else list(argv)


# --- observing the current state (pure parsers) ------------------------------------------------


def parse_json(stdout: str) -> list[dict[str, Any]]:
    """``ip -j`` output: a JSON list (empty output, as some versions print for nothing, is [])."""
    text = stdout.strip()
    if not text:
        return []
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list from ip -j, got {type(data).__name__}")
    return [d for d in data if isinstance(d, dict)]


def parse_inet_addresses(stdout: str) -> dict[str, frozenset[str]]:
    """``ip -j addr show``: interface name -> its IPv4 addresses as ``a.b.c.d/len``."""
    found: dict[str, frozenset[str]] = {}
    for link in parse_json(stdout):
        cidrs = frozenset(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if isinstance(a, dict) and a.get("family") == "inet"
        )
        found[str(link.get("ifname"))] = cidrs
    return found


@dataclass(frozen=True)
class Observed:
    """What exists now, as far as this cluster's topology is concerned."""

    namespaces: frozenset[str] = frozenset()
    #: Root-namespace interface name -> its bridge ("master"), or "" if none.
    links: Mapping[str, str] = field(default_factory=dict)
    #: The bridge's IPv4 addresses.
    bridge_addresses: frozenset[str] = frozenset()
    #: Root-namespace IPv4 routes as (destination, device); "default" left out.
    routes: tuple[tuple[str, str], ...] = ()
    #: Namespace -> its interfaces -> their IPv4 addresses (existing namespaces only).
    ns_links: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)
    #: Namespace -> destinations of its blackhole routes (as ``ip`` prints them).
    blackholes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def parse_routes(stdout: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (str(r["dst"]), str(r.get("dev", "")))
        for r in parse_json(stdout)
        if r.get("dst") not in (None, "default")
    )


def conflicts(topo: Topology, observed: Observed) -> list[str]:
    """Reasons ``setup`` must not touch this machine: the subnet is already routed elsewhere
    (another network, another cluster's bridge), or a namespace holds an ``eth0`` that is not
    the one our veth pair made."""
    problems: list[str] = []
    for dst, dev in observed.routes:
        if dev == topo.bridge:
            continue
        try:
            network = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if network.overlaps(topo.subnet):
            problems.append(
                f"{topo.subnet} (from mqtt.embedded_host) overlaps the route {dst} dev {dev} "
                "that this machine already has; pick another subnet for the bridge and nodes"
            )
    for node in topo.nodes:
        inside = observed.ns_links.get(node.netns, {})
        if NS_IFNAME in inside and node.veth not in observed.links:
            problems.append(
                f"namespace {node.netns!r} already has an {NS_IFNAME} that is not node "
                f"{node.name}'s veth pair (made by something else?); choose another netns "
                f"name or run `ip netns del {node.netns}`"
            )
    return problems


def setup_commands(topo: Topology, observed: Observed) -> list[list[str]]:
    """The ``ip`` commands that turn ``observed`` into ``topo``; what already exists is not
    created again, and a stale address (the config changed) is replaced."""
    br = topo.bridge
    cmds: list[list[str]] = []
    if br not in observed.links:
        cmds.append(["ip", "link", "add", br, "type", "bridge", *_BRIDGE_NO_FIREWALL])
    for stale in sorted(observed.bridge_addresses - {topo.bridge_cidr}):
        cmds.append(["ip", "addr", "del", stale, "dev", br])
    if topo.bridge_cidr not in observed.bridge_addresses:
        cmds.append(["ip", "addr", "add", topo.bridge_cidr, "dev", br])
    cmds.append(["ip", "link", "set", br, "up"])
    for node in topo.nodes:
        ns = node.netns
        if ns not in observed.namespaces:
            cmds.append(["ip", "netns", "add", ns])
        fresh = node.veth not in observed.links
        if fresh:
            peer = ("peer", "name", NS_IFNAME, "netns", ns)
            cmds.append(["ip", "link", "add", node.veth, "type", "veth", *peer])
        if fresh or observed.links.get(node.veth) != br:
            cmds.append(["ip", "link", "set", node.veth, "master", br])
        cmds.append(["ip", "link", "set", node.veth, "up"])
        inside = observed.ns_links.get(ns, {})
        present = frozenset() if fresh else inside.get(NS_IFNAME, frozenset())
        for stale in sorted(present - {node.cidr}):
            cmds.append(["ip", "-n", ns, "addr", "del", stale, "dev", NS_IFNAME])
        if node.cidr not in present:
            cmds.append(["ip", "-n", ns, "addr", "add", node.cidr, "dev", NS_IFNAME])
        cmds.append(["ip", "-n", ns, "link", "set", "lo", "up"])
        cmds.append(["ip", "-n", ns, "link", "set", NS_IFNAME, "up"])
    return cmds


def teardown_commands(topo: Topology, observed: Observed) -> list[list[str]]:
    """Remove what exists of ``topo``: veth pairs (deleting one end deletes both, even while a
    process still holds the namespace), any other veth of ours left on the bridge by an
    earlier config, the namespaces, then the bridge."""
    cmds: list[list[str]] = []
    veths = [n.veth for n in topo.nodes]
    leftovers = sorted(
        name
        for name, master in observed.links.items()
        if master == topo.bridge and name.startswith(VETH_PREFIX) and name not in veths
    )
    for veth in [*veths, *leftovers]:
        if veth in observed.links:
            cmds.append(["ip", "link", "del", veth])
    for node in topo.nodes:
        if node.netns in observed.namespaces:
            cmds.append(["ip", "netns", "del", node.netns])
    if topo.bridge in observed.links:
        cmds.append(["ip", "link", "del", topo.bridge])
    return cmds


def partition_commands(topo: Topology, a: str, b: str, one_way: bool = False) -> list[list[str]]:
    """Blackhole routes: in ``a``'s namespace to ``b``'s address, and (unless ``one_way``) in
    ``b``'s to ``a``'s. ``replace`` makes a repeated partition a no-op instead of an error.

    With TCP a one-way cut stalls connections in both directions, since the side that cannot
    send cannot acknowledge either (a's SYN-ACKs and ACKs to b are dropped too); what differs
    from a full cut is that b's packets still reach a, so a sees b's connection attempts.
    """
    if a == b:
        raise NetnsError(f"cannot partition {a} from itself")
    src, dst = topo.node(a), topo.node(b)
    pairs = [(src, dst)] if one_way else [(src, dst), (dst, src)]
    cmds: list[list[str]] = []
    for frm, to in pairs:
        # Only ever a node address this topology created (never anything else on the machine).
        assert to.address in topo.subnet
        cmds.append(["ip", "-n", frm.netns, "route", "replace", "blackhole", f"{to.address}/32"])
    return cmds


def heal_commands(topo: Topology, observed: Observed) -> list[list[str]]:
    """Delete every blackhole route in the cluster's namespaces (and nothing outside them)."""
    return [
        ["ip", "-n", node.netns, "route", "del", "blackhole", dst]
        for node in topo.nodes
        for dst in observed.blackholes.get(node.netns, ())
    ]


# --- status (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeNet:
    node: str
    netns: str
    address: str
    veth: str
    netns_exists: bool
    veth_exists: bool
    address_configured: bool
    #: Nodes (or, for a route not made by us, raw destinations) this node cannot send to.
    blackholed: tuple[str, ...]


@dataclass(frozen=True)
class NetnsStatus:
    cluster: str
    bridge: str
    bridge_address: str
    bridge_exists: bool
    bridge_address_configured: bool
    nodes: tuple[NodeNet, ...]

    @property
    def complete(self) -> bool:
        """Everything ``setup`` builds is there."""
        return (
            self.bridge_exists
            and self.bridge_address_configured
            and all(n.netns_exists and n.veth_exists and n.address_configured for n in self.nodes)
        )

    @property
    def absent(self) -> bool:
        """Nothing of the topology is left (after ``teardown``)."""
        return not self.bridge_exists and not any(
            n.netns_exists or n.veth_exists for n in self.nodes
        )

    def partitions(self) -> list[tuple[str, str]]:
        """(from, to): ``from``'s packets to ``to`` are dropped."""
        return [(n.node, to) for n in self.nodes for to in n.blackholed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "bridge": self.bridge,
            "bridge_address": self.bridge_address,
            "bridge_exists": self.bridge_exists,
            "bridge_address_configured": self.bridge_address_configured,
            "complete": self.complete,
            "nodes": [
                {
                    "node": n.node,
                    "netns": n.netns,
                    "address": n.address,
                    "veth": n.veth,
                    "netns_exists": n.netns_exists,
                    "veth_exists": n.veth_exists,
                    "address_configured": n.address_configured,
                    "blackholed": list(n.blackholed),
                }
                for n in self.nodes
            ],
            "partitions": [list(p) for p in self.partitions()],
        }


def describe(topo: Topology, observed: Observed) -> NetnsStatus:
    names = topo.by_address()

    def target(dst: str) -> str:
        return names.get(dst.removesuffix("/32"), dst)

    return NetnsStatus(
        cluster=topo.cluster,
        bridge=topo.bridge,
        bridge_address=topo.bridge_cidr,
        bridge_exists=topo.bridge in observed.links,
        bridge_address_configured=topo.bridge_cidr in observed.bridge_addresses,
        nodes=tuple(
            NodeNet(
                node=n.name,
                netns=n.netns,
                address=n.cidr,
                veth=n.veth,
                netns_exists=n.netns in observed.namespaces,
                veth_exists=n.veth in observed.links,
                address_configured=n.cidr
                in observed.ns_links.get(n.netns, {}).get(NS_IFNAME, frozenset()),
                blackholed=tuple(target(d) for d in observed.blackholes.get(n.netns, ())),
            )
            for n in topo.nodes
        ),
    )


# --- the thin runners -------------------------------------------------------------------------


@dataclass(frozen=True)
class IpResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def gone(self) -> bool:
        """Failed only because the thing was already absent."""
        return self.returncode != 0 and any(g in self.stderr for g in _GONE)


#: Runs one ``ip`` argv (argv[0] is "ip"); tests substitute a fake.
IpRunner = Callable[[Sequence[str]], IpResult]


def ip_binary() -> str:
    """The ``ip`` executable; NetnsError saying how to install it if there is none."""
    found = shutil.which("ip") or shutil.which("ip", path=_SBIN)
    if found is None:
        raise NetnsError(
            "`ip` (iproute2) is not installed (not on PATH nor in /usr/sbin or /sbin): "
            "install it, e.g. `apt-get install iproute2`"
        )
    return found


def check_environment(euid: int | None = None) -> str:
    """Refuse early, with the reason, where namespaces cannot be managed: not root (creating
    namespaces and interfaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN) or no iproute2. Returns
    the ``ip`` binary."""
    binary = ip_binary()
    if (os.geteuid() if euid is None else euid) != 0:
        raise NetnsError(
            "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run this as root, "
            "e.g. `sudo kmctl ...`"
        )
    return binary


def system_runner() -> IpRunner:
    """Runs the real ``ip``, after :func:`check_environment`."""
    binary = check_environment()

    def run(argv: Sequence[str]) -> IpResult:
        full = [binary, *argv[1:]] if argv and argv[0] == "ip" else list(argv)
        try:
            done = subprocess.run(full, capture_output=True, text=True, timeout=_IP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return IpResult(tuple(argv), -1, "", f"timed out after {_IP_TIMEOUT:g}s")
        return IpResult(tuple(argv), done.returncode, done.stdout, done.stderr)

    return run


def _failed(result: IpResult) -> NetnsError:
    reason = result.stderr.strip() or f"exit code {result.returncode}"
    return NetnsError(f"`{' '.join(result.argv)}` failed: {reason}")


def _query(run: IpRunner, argv: Sequence[str]) -> str:
    result = run(argv)
    if result.returncode != 0:
        raise _failed(result)
    return result.stdout


def _parsed(text: str, what: str) -> list[dict[str, Any]]:
    try:
        return parse_json(text)
    except ValueError as exc:
        raise NetnsError(f"cannot read the output of `ip -j {what}`: {exc}") from None


def observe(topo: Topology, run: IpRunner) -> Observed:
    """The current state of everything ``topo`` is about (a few ``ip -j`` queries)."""
    namespaces = frozenset(
        str(n["name"]) for n in _parsed(_query(run, ["ip", "-j", "netns", "list"]), "netns list")
    )
    links = {
        str(link["ifname"]): str(link.get("master", ""))
        for link in _parsed(_query(run, ["ip", "-j", "link", "show"]), "link show")
    }
    bridge_addresses: frozenset[str] = frozenset()
    if topo.bridge in links:
        text = _query(run, ["ip", "-j", "-4", "addr", "show", "dev", topo.bridge])
        bridge_addresses = parse_inet_addresses(text).get(topo.bridge, frozenset())
    routes = parse_routes(_query(run, ["ip", "-j", "-4", "route", "show"]))
    ns_links: dict[str, Mapping[str, frozenset[str]]] = {}
    blackholes: dict[str, tuple[str, ...]] = {}
    for node in topo.nodes:
        if node.netns not in namespaces:
            continue
        ns_links[node.netns] = parse_inet_addresses(
            _query(run, ["ip", "-n", node.netns, "-j", "addr", "show"])
        )
        text = _query(run, ["ip", "-n", node.netns, "-j", "-4", "route", "show", *_BLACKHOLES])
        blackholes[node.netns] = tuple(str(r["dst"]) for r in _parsed(text, "route show"))
    return Observed(
        namespaces=namespaces,
        links=links,
        bridge_addresses=bridge_addresses,
        routes=routes,
        ns_links=ns_links,
        blackholes=blackholes,
    )


def _run_all(run: IpRunner, cmds: Sequence[Sequence[str]], tolerate_gone: bool) -> None:
    failures: list[NetnsError] = []
    for argv in cmds:
        result = run(argv)
        if result.returncode == 0 or (tolerate_gone and result.gone):
            continue
        if not tolerate_gone:
            raise _failed(result)
        failures.append(_failed(result))
    if failures:
        raise NetnsError("; ".join(str(f) for f in failures))


def setup(cfg: ClusterConfig, run: IpRunner | None = None) -> NetnsStatus:
    """Create the bridge, namespaces, veth pairs and addresses of ``cfg`` (what is missing of
    them); refuse, before changing anything, a subnet that this machine already routes."""
    topo = topology(cfg)
    run = run or system_runner()
    observed = observe(topo, run)
    problems = conflicts(topo, observed)
    if problems:
        raise NetnsError("; ".join(problems))
    _run_all(run, setup_commands(topo, observed), tolerate_gone=False)
    return describe(topo, observe(topo, run))


def teardown(cfg: ClusterConfig, run: IpRunner | None = None) -> NetnsStatus:
    """Remove the topology of ``cfg``. Whatever is already gone is skipped; every step is tried
    even if one fails, and only then is the failure raised."""
    topo = topology(cfg)
    run = run or system_runner()
    _run_all(run, teardown_commands(topo, observe(topo, run)), tolerate_gone=True)
    return describe(topo, observe(topo, run))


def partition(
    cfg: ClusterConfig, a: str, b: str, one_way: bool = False, run: IpRunner | None = None
) -> list[tuple[str, str]]:
    """Cut ``a`` from ``b`` at the IP level (both directions unless ``one_way``); returns the
    (from, to) pairs now cut. Both namespaces must exist (``setup`` first)."""
    topo = topology(cfg)
    cmds = partition_commands(topo, a, b, one_way)
    run = run or system_runner()
    observed = observe(topo, run)
    missing = [n for n in (topo.node(a), topo.node(b)) if n.netns not in observed.namespaces]
    if missing:
        raise NetnsError(
            f"namespace {missing[0].netns!r} of {missing[0].name} does not exist: run "
            "`kmctl chaos netns setup` first"
        )
    _run_all(run, cmds, tolerate_gone=False)
    return [(a, b)] if one_way else [(a, b), (b, a)]


def heal(cfg: ClusterConfig, run: IpRunner | None = None) -> None:
    """Remove every blackhole route in the cluster's namespaces (``status`` before it tells
    what was cut). A namespace or route that is already gone is not an error."""
    topo = topology(cfg)
    run = run or system_runner()
    _run_all(run, heal_commands(topo, observe(topo, run)), tolerate_gone=True)


def status(cfg: ClusterConfig, run: IpRunner | None = None) -> NetnsStatus:
    """What exists of ``cfg``'s topology and which blackholes are active."""
    topo = topology(cfg)
    return describe(topo, observe(topo, run or system_runner()))


# --- what the supervisor needs before starting a node in a namespace ---------------------------


def parse_listening(stdout: str) -> set[tuple[str, int]]:
    """``ss -Hltn`` lines: the (address, port) pairs listened on (``*`` for any address)."""
    found: set[tuple[str, int]] = set()
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local = fields[3]
        host, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        host = host.strip("[]").split("%")[0]
        found.add(("*" if host in ("*", "0.0.0.0", "::") else host, int(port)))
    return found


def check_node_namespace(node: NodeSpec, run: IpRunner | None = None) -> str | None:
    """Before starting ``node`` in its namespace: NetnsError if the namespace is missing or
    lacks the node's address, or if its ports are taken inside it. Returns a reason when the
    port check had to be skipped (no ``ss``), else None."""
    assert node.netns is not None
    run = run or system_runner()
    result = run(["ip", "-n", node.netns, "-j", "-4", "addr", "show"])
    if result.returncode != 0:
        raise NetnsError(
            f"cannot start {node.name} in network namespace {node.netns!r}: "
            f"{result.stderr.strip() or 'not accessible'}; run `kmctl chaos netns setup` first"
        )
    per_link = parse_inet_addresses(result.stdout).values()
    addresses = {cidr.split("/")[0] for cidrs in per_link for cidr in cidrs}
    if node.host not in addresses:
        raise NetnsError(
            f"cannot start {node.name}: its address {node.host} is not configured in network "
            f"namespace {node.netns!r}; run `kmctl chaos netns setup` (again) first"
        )
    ss = shutil.which("ss") or shutil.which("ss", path=_SBIN)
    if ss is None:
        return "`ss` (iproute2) not found: ports inside the namespace were not checked"
    try:
        done = subprocess.run(
            [ss, "-N", node.netns, "-Hltn"], capture_output=True, text=True, timeout=_IP_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return "`ss` timed out: ports inside the namespace were not checked"
    if done.returncode != 0:
        return f"`ss -N {node.netns}` failed ({done.stderr.strip()}): ports not checked"
    listening = parse_listening(done.stdout)
    for label, port in (("api_port", node.api_port), ("peer_port", node.peer_port)):
        if (node.host, port) in listening or ("*", port) in listening:
            raise NetnsError(
                f"cannot start {node.name}: {node.host}:{port} ({label}) is already listened on "
                f"in network namespace {node.netns!r} (is the node running already?)"
            )
    return None
