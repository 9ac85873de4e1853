"""kmnode.netns without root: names, validation, the ``ip`` argv lists, the parsers, and
the runners against a fake ``ip`` that keeps the state a real one would (so idempotency and
"teardown never fails on what is gone" are checked end to end), plus `kmctl chaos netns`."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from kmnode import netns
from kmnode.cli.context import CliContext
from kmnode.cli.netns_cmds import netns as netns_group
from kmnode.cli.output import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE
from kmnode.config import ClusterConfig, ConfigError, NodeSpec, load_config, parse_config
from kmnode.netns import IpResult, NetnsError, Observed

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "netns-cluster.yaml"


def example_data(**mqtt: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["mqtt"].update(mqtt)
    return data


def example(**mqtt: Any) -> ClusterConfig:
    return ClusterConfig.model_validate(example_data(**mqtt))


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


# --- config ----------------------------------------------------------------------------------


def test_example_config_is_valid_and_describes_three_namespaces() -> None:
    cfg = load_config(EXAMPLE)
    assert [(n.netns, n.host) for n in cfg.nodes] == [
        ("kmsim-km1", "10.77.0.11"),
        ("kmsim-km2", "10.77.0.12"),
        ("kmsim-km3", "10.77.0.13"),
    ]
    assert cfg.mqtt.embedded_host == "10.77.0.1"


def test_defaults_have_no_namespace_and_a_loopback_broker() -> None:
    cfg = ClusterConfig.default()
    assert all(n.netns is None for n in cfg.nodes)
    assert cfg.mqtt.embedded_host == "127.0.0.1"


def test_netns_node_on_loopback_is_refused_naming_the_field() -> None:
    data = example_data()
    data["nodes"][1]["host"] = "127.0.0.2"
    problems = problems_of(data)
    assert len(problems) == 1
    assert problems[0].startswith("nodes[1].host: 127.0.0.2 is a loopback address"), problems


def test_netns_rules_every_node_one_namespace_each_and_a_reachable_broker() -> None:
    data = example_data(embedded_host="127.0.0.1")
    del data["nodes"][2]["netns"]
    data["nodes"][1]["netns"] = "kmsim-km1"
    data["nodes"][0]["host"] = "km1.example"
    paths = sorted(p.split(":")[0] for p in problems_of(data))
    assert paths == ["mqtt.embedded_host", "nodes[0].host", "nodes[1].netns", "nodes[2].netns"]


def test_embedded_host_must_be_an_ipv4_address() -> None:
    problems = problems_of(example_data(embedded_host="broker.local"))
    assert problems == [
        "mqtt.embedded_host: Value error, 'broker.local' is not an IPv4 address (e.g. 127.0.0.1)"
    ]


def test_external_broker_needs_no_bridge_broker() -> None:
    parse_config(example_data(embedded_host="127.0.0.1", url="mqtt://10.77.0.1:1883"))


# --- names and topology ----------------------------------------------------------------------


def test_interface_names_fit_linux_and_differ_per_cluster_and_node() -> None:
    long = "a" * 32
    names = {
        netns.bridge_name("demo"),
        netns.bridge_name(long),
        netns.bridge_name(long[:-1] + "b"),
        netns.veth_name("demo", "km1"),
        netns.veth_name("demo", "km2"),
        netns.veth_name("other", "km1"),
        netns.veth_name(long, long),
        netns.veth_name(long, long[:-1] + "b"),
    }
    assert len(names) == 8
    assert all(len(n) <= 15 for n in names)
    assert netns.bridge_name("demo") == netns.bridge_name("demo")
    assert netns.bridge_name("demo").startswith("kmb")
    assert netns.veth_name("demo", "km1").startswith("kmv")


def test_topology_of_the_example() -> None:
    topo = netns.topology(example())
    assert topo.cluster == "netns-demo"
    assert topo.bridge_cidr == "10.77.0.1/24"
    assert str(topo.subnet) == "10.77.0.0/24"
    assert [(n.name, n.netns, n.cidr) for n in topo.nodes] == [
        ("km1", "kmsim-km1", "10.77.0.11/24"),
        ("km2", "kmsim-km2", "10.77.0.12/24"),
        ("km3", "kmsim-km3", "10.77.0.13/24"),
    ]
    assert topo.by_address()["10.77.0.12"] == "km2"


def test_topology_needs_nodes_in_namespaces() -> None:
    with pytest.raises(NetnsError, match="no node of cluster 'demo' has `netns` set"):
        netns.topology(ClusterConfig.default())


def test_node_outside_the_bridge_subnet_is_refused() -> None:
    data = example_data()
    data["nodes"][2]["host"] = "10.78.0.13"
    with pytest.raises(NetnsError, match=r"nodes\[2\]\.host: 10\.78\.0\.13 is outside the bridge"):
        netns.topology(ClusterConfig.model_validate(data))


@pytest.mark.parametrize("bridge", ["8.8.8.8", "169.254.0.1", "10.77.0.0", "10.77.0.255"])
def test_bridge_must_be_a_private_unicast_host_address(bridge: str) -> None:
    with pytest.raises(NetnsError, match=r"^mqtt\.embedded_host: "):
        netns.topology(example(embedded_host=bridge))


def test_node_addresses_must_differ_from_each_other_and_the_bridge() -> None:
    data = example_data()
    data["nodes"][1]["host"] = "10.77.0.11"
    with pytest.raises(NetnsError, match=r"nodes\[1\]\.host: 10\.77\.0\.11 is also nodes\[0\]"):
        netns.topology(ClusterConfig.model_validate(data))
    data["nodes"][1]["host"] = "10.77.0.1"
    with pytest.raises(NetnsError, match=r"is also mqtt\.embedded_host"):
        netns.topology(ClusterConfig.model_validate(data))


def test_exec_wrapping_and_unwrapping() -> None:
    inner = ["/usr/bin/python3", "-m", "kmnode.cli", "node", "run", "km1"]
    wrapped = netns.exec_argv("ns1", inner, "/usr/sbin/ip")
    assert wrapped == ["/usr/sbin/ip", "netns", "exec", "ns1", *inner]
    assert netns.unwrap_exec(wrapped) == inner
    assert netns.unwrap_exec(inner) == inner
    assert netns.unwrap_exec(["ip", "netns", "exec", "ns1"]) == ["ip", "netns", "exec", "ns1"]
    node = NodeSpec.model_validate(
        {"name": "km1", "peer_port": 1, "api_port": 2, "platform": {"id": "p"}}
    )
    assert netns.node_argv(node, inner) == inner
    in_ns = node.model_copy(update={"netns": "ns1"})
    assert netns.node_argv(in_ns, inner) == ["ip", "netns", "exec", "ns1", *inner]


# --- argv lists ------------------------------------------------------------------------------


def test_setup_from_nothing() -> None:
    topo = netns.topology(example())
    br, v1 = topo.bridge, topo.nodes[0].veth
    cmds = netns.setup_commands(topo, Observed())
    no_firewall = ["nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0"]
    assert cmds[:3] == [
        ["ip", "link", "add", br, "type", "bridge", *no_firewall],
        ["ip", "addr", "add", "10.77.0.1/24", "dev", br],
        ["ip", "link", "set", br, "up"],
    ]
    assert cmds[3:11] == [
        ["ip", "netns", "add", "kmsim-km1"],
        ["ip", "link", "add", v1, "type", "veth", "peer", "name", "eth0", "netns", "kmsim-km1"],
        ["ip", "link", "set", v1, "master", br],
        ["ip", "link", "set", v1, "up"],
        ["ip", "-n", "kmsim-km1", "addr", "add", "10.77.0.11/24", "dev", "eth0"],
        ["ip", "-n", "kmsim-km1", "link", "set", "lo", "up"],
        ["ip", "-n", "kmsim-km1", "link", "set", "eth0", "up"],
        ["ip", "netns", "add", "kmsim-km2"],
    ]
    assert len(cmds) == 3 + 3 * 7


def complete(topo: netns.Topology, **changes: Any) -> Observed:
    observed = Observed(
        namespaces=frozenset(n.netns for n in topo.nodes),
        links={topo.bridge: "", **{n.veth: topo.bridge for n in topo.nodes}},
        bridge_addresses=frozenset({topo.bridge_cidr}),
        routes=((str(topo.subnet), topo.bridge),),
        ns_links={
            n.netns: {"lo": frozenset({"127.0.0.1/8"}), "eth0": frozenset({n.cidr})}
            for n in topo.nodes
        },
    )
    return Observed(**{**observed.__dict__, **changes})


def test_setup_of_a_complete_topology_only_brings_links_up() -> None:
    topo = netns.topology(example())
    cmds = netns.setup_commands(topo, complete(topo))
    assert all(c[-1] == "up" and "set" in c for c in cmds), cmds
    assert netns.conflicts(topo, complete(topo)) == []


def test_setup_replaces_a_stale_address() -> None:
    topo = netns.topology(example())
    observed = complete(topo)
    stale = {**observed.ns_links, "kmsim-km2": {"eth0": frozenset({"10.77.0.99/24"})}}
    cmds = netns.setup_commands(topo, complete(topo, ns_links=stale))
    assert ["ip", "-n", "kmsim-km2", "addr", "del", "10.77.0.99/24", "dev", "eth0"] in cmds
    assert ["ip", "-n", "kmsim-km2", "addr", "add", "10.77.0.12/24", "dev", "eth0"] in cmds


def test_conflicts_an_overlapping_route_and_a_foreign_eth0() -> None:
    topo = netns.topology(example())
    observed = Observed(
        namespaces=frozenset({"kmsim-km1"}),
        routes=(("10.77.0.0/16", "docker0"), ("192.0.2.0/24", "eth0")),
        ns_links={"kmsim-km1": {"eth0": frozenset()}},
    )
    problems = netns.conflicts(topo, observed)
    assert len(problems) == 2
    assert "overlaps the route 10.77.0.0/16 dev docker0" in problems[0]
    assert "namespace 'kmsim-km1' already has an eth0" in problems[1]


def test_teardown_of_a_partial_topology_removes_only_what_exists() -> None:
    topo = netns.topology(example())
    observed = Observed(
        namespaces=frozenset({"kmsim-km2"}),
        links={topo.nodes[0].veth: topo.bridge, topo.bridge: "", "kmv000000-old": topo.bridge},
    )
    assert netns.teardown_commands(topo, observed) == [
        ["ip", "link", "del", topo.nodes[0].veth],
        ["ip", "link", "del", "kmv000000-old"],
        ["ip", "netns", "del", "kmsim-km2"],
        ["ip", "link", "del", topo.bridge],
    ]
    assert netns.teardown_commands(topo, Observed(links={"eth0": ""})) == []


def test_partition_and_heal_commands() -> None:
    topo = netns.topology(example())
    assert netns.partition_commands(topo, "km1", "km3") == [
        ["ip", "-n", "kmsim-km1", "route", "replace", "blackhole", "10.77.0.13/32"],
        ["ip", "-n", "kmsim-km3", "route", "replace", "blackhole", "10.77.0.11/32"],
    ]
    assert netns.partition_commands(topo, "km2", "km1", one_way=True) == [
        ["ip", "-n", "kmsim-km2", "route", "replace", "blackhole", "10.77.0.11/32"],
    ]
    with pytest.raises(NetnsError, match="from itself"):
        netns.partition_commands(topo, "km1", "km1")
    with pytest.raises(NetnsError, match="no node named 'km9'"):
        netns.partition_commands(topo, "km1", "km9")
    observed = Observed(blackholes={"kmsim-km1": ("10.77.0.13",), "kmsim-km3": ()})
    assert netns.heal_commands(topo, observed) == [
        ["ip", "-n", "kmsim-km1", "route", "del", "blackhole", "10.77.0.13"],
    ]


# --- parsers ---------------------------------------------------------------------------------


def test_parsers() -> None:
    addr = json.dumps(
        [
            {
                "ifname": "lo",
                "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}],
            },
            {
                "ifname": "eth0",
                "addr_info": [
                    {"family": "inet", "local": "10.77.0.11", "prefixlen": 24},
                    {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
                ],
            },
        ]
    )
    assert netns.parse_inet_addresses(addr) == {
        "lo": frozenset({"127.0.0.1/8"}),
        "eth0": frozenset({"10.77.0.11/24"}),
    }
    assert netns.parse_json("") == []
    routes = '[{"dst":"default","dev":"eth0"},{"dst":"192.0.2.0/24","dev":"eth0"}]'
    assert netns.parse_routes(routes) == (("192.0.2.0/24", "eth0"),)
    ss = (
        "LISTEN 0 128 10.77.0.11:7101 0.0.0.0:*\n"
        "LISTEN 0 128 *:7201 *:*\n"
        "LISTEN 0 128 [::]:9000 [::]:*\n"
    )
    assert netns.parse_listening(ss) == {("10.77.0.11", 7101), ("*", 7201), ("*", 9000)}


# --- runners against a fake ip ---------------------------------------------------------------


class FakeIp:
    """The state an ``ip`` would change, and answers to the queries ``observe`` makes."""

    def __init__(self, routes: Sequence[dict[str, str]] = ()) -> None:
        self.namespaces: dict[str, dict[str, set[str]]] = {}  # ns -> ifname -> cidrs
        self.links: dict[str, str] = {"lo": "", "eth0": ""}  # root ifname -> master
        self.addresses: dict[str, set[str]] = {}
        self.blackholes: dict[str, list[str]] = {}
        self.peers: dict[str, str] = {}  # veth -> namespace of its peer
        self.routes = list(routes)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> IpResult:
        argv = list(argv)
        self.calls.append(argv)
        try:
            out = self._do(argv[1:])
        except LookupError as exc:
            return IpResult(tuple(argv), 1, "", f"{exc.args[0]}\n")
        return IpResult(tuple(argv), 0, out, "")

    def _ns(self, name: str) -> dict[str, set[str]]:
        if name not in self.namespaces:
            raise LookupError(f'Cannot open network namespace "{name}": No such file or directory')
        return self.namespaces[name]

    def _link(self, name: str) -> None:
        if name not in self.links:
            raise LookupError(f'Cannot find device "{name}"')

    def _do(self, a: list[str]) -> str:
        if a[0] == "-n":
            return self._in_ns(a[1], a[2:])
        if a[:3] == ["-j", "netns", "list"]:
            return json.dumps([{"name": n} for n in self.namespaces])
        if a[:3] == ["-j", "link", "show"]:
            return json.dumps([{"ifname": n, "master": m} for n, m in self.links.items()])
        if a[:4] == ["-j", "-4", "addr", "show"]:
            self._link(a[5])
            info = [
                {"family": "inet", "local": c.split("/")[0], "prefixlen": 24}
                for c in self.addresses.get(a[5], set())
            ]
            return json.dumps([{"ifname": a[5], "addr_info": info}])
        if a[:4] == ["-j", "-4", "route", "show"]:
            connected = [
                {"dst": str(ipaddress.IPv4Interface(c).network), "dev": d}
                for d, cs in self.addresses.items()
                for c in cs
            ]
            return json.dumps(self.routes + connected)
        if a[:2] == ["netns", "add"]:
            self.namespaces.setdefault(a[2], {"lo": {"127.0.0.1/8"}})
        elif a[:2] == ["netns", "del"]:
            self._ns(a[2])
            del self.namespaces[a[2]]
            for veth, ns in list(self.peers.items()):
                if ns == a[2]:
                    self.links.pop(veth, None)
                    del self.peers[veth]
        elif a[:2] == ["link", "add"] and a[3:5] == ["type", "bridge"]:
            self.links[a[2]] = ""
        elif a[:2] == ["link", "add"] and a[3:5] == ["type", "veth"]:
            self._ns(a[9])["eth0"] = set()
            self.links[a[2]], self.peers[a[2]] = "", a[9]
        elif a[:2] == ["link", "set"]:
            self._link(a[2])
            if a[3] == "master":
                self.links[a[2]] = a[4]
        elif a[:2] == ["link", "del"]:
            self._link(a[2])
            del self.links[a[2]]
            if a[2] in self.peers:
                self.namespaces.get(self.peers.pop(a[2]), {}).pop("eth0", None)
            self.addresses.pop(a[2], None)
        elif a[:2] == ["addr", "add"]:
            self._link(a[4])
            self.addresses.setdefault(a[4], set()).add(a[2])
        elif a[:2] == ["addr", "del"]:
            self.addresses[a[4]].discard(a[2])
        else:
            raise AssertionError(f"unexpected ip {a}")
        return ""

    def _in_ns(self, ns: str, a: list[str]) -> str:
        links = self._ns(ns)
        if a[:3] == ["-j", "addr", "show"] or a[:4] == ["-j", "-4", "addr", "show"]:
            return json.dumps(
                [
                    {
                        "ifname": name,
                        "addr_info": [
                            {
                                "family": "inet",
                                "local": c.split("/")[0],
                                "prefixlen": int(c.split("/")[1]),
                            }
                            for c in cidrs
                        ],
                    }
                    for name, cidrs in links.items()
                ]
            )
        if a[:4] == ["-j", "-4", "route", "show"]:
            return json.dumps(
                [{"type": "blackhole", "dst": d} for d in self.blackholes.get(ns, [])]
            )
        if a[:2] == ["addr", "add"]:
            links[a[4]].add(a[2])
        elif a[:2] == ["addr", "del"]:
            links[a[4]].discard(a[2])
        elif a[:2] == ["link", "set"]:
            if a[2] not in links:
                raise LookupError(f'Cannot find device "{a[2]}"')
        elif a[:3] == ["route", "replace", "blackhole"]:
            dst = a[3].removesuffix("/32")
            if dst not in self.blackholes.setdefault(ns, []):
                self.blackholes[ns].append(dst)
        elif a[:3] == ["route", "del", "blackhole"]:
            self.blackholes[ns].remove(a[3])
        else:
            raise AssertionError(f"unexpected ip -n {ns} {a}")
        return ""

    def changes(self) -> list[list[str]]:
        """Calls that changed something (not queries, not the idempotent `set ... up`)."""
        return [c for c in self.calls if "-j" not in c and c[-1] != "up"]


def test_setup_twice_status_partition_heal_and_teardown_twice() -> None:
    cfg, ip = example(), FakeIp()
    status = netns.setup(cfg, ip)
    assert status.complete and not status.partitions()
    ip.calls.clear()
    assert netns.setup(cfg, ip).complete
    assert ip.changes() == [], "a second setup must not create anything"

    assert netns.partition(cfg, "km1", "km2", run=ip) == [("km1", "km2"), ("km2", "km1")]
    assert netns.partition(cfg, "km3", "km1", one_way=True, run=ip) == [("km3", "km1")]
    netns.partition(cfg, "km1", "km2", run=ip)  # again: still one route each
    assert netns.status(cfg, ip).partitions() == [("km1", "km2"), ("km2", "km1"), ("km3", "km1")]
    netns.heal(cfg, ip)
    assert netns.status(cfg, ip).partitions() == []
    netns.heal(cfg, ip)

    assert netns.teardown(cfg, ip).absent
    assert ip.links == {"lo": "", "eth0": ""} and ip.namespaces == {}
    ip.calls.clear()
    assert netns.teardown(cfg, ip).absent
    assert ip.changes() == []


def test_teardown_tolerates_what_vanishes_meanwhile() -> None:
    cfg, ip = example(), FakeIp()
    netns.setup(cfg, ip)
    inner = ip._do

    def racing(a: list[str]) -> str:
        if a[:2] == ["link", "del"] and a[2].startswith("kmv"):
            ip.links.pop(a[2], None)  # someone else removed it first
        return inner(a)

    ip._do = racing  # type: ignore[method-assign]
    assert netns.teardown(cfg, ip).absent


def test_setup_refuses_a_subnet_in_use_before_changing_anything() -> None:
    ip = FakeIp(routes=[{"dst": "10.77.0.0/16", "dev": "br-docker"}])
    with pytest.raises(NetnsError, match=r"overlaps the route 10\.77\.0\.0/16 dev br-docker"):
        netns.setup(example(), ip)
    assert ip.changes() == []


def test_partition_needs_the_namespaces() -> None:
    with pytest.raises(NetnsError, match="namespace 'kmsim-km1' of km1 does not exist"):
        netns.partition(example(), "km1", "km2", run=FakeIp())


def test_a_failing_ip_command_is_reported_with_its_argv() -> None:
    def refuse(argv: Sequence[str]) -> IpResult:
        if "-j" in argv:
            return FakeIp()(argv)
        return IpResult(tuple(argv), 2, "", "RTNETLINK answers: Operation not permitted\n")

    with pytest.raises(NetnsError, match=r"`ip link add kmb\S+ type bridge .*` failed: RTNETLINK"):
        netns.setup(example(), refuse)


def test_environment_checks_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NetnsError, match="need root"):
        netns.check_environment(euid=1000)
    monkeypatch.setattr("kmnode.netns.shutil.which", lambda *_a, **_k: None)
    with pytest.raises(NetnsError, match="apt-get install iproute2"):
        netns.check_environment(euid=0)


def test_node_namespace_check_before_start() -> None:
    cfg, ip = example(), FakeIp()
    node = cfg.node("km1")
    with pytest.raises(NetnsError, match="run `kmctl chaos netns setup` first"):
        netns.check_node_namespace(node, ip)
    netns.setup(cfg, ip)
    ip.namespaces["kmsim-km1"]["eth0"].clear()
    with pytest.raises(NetnsError, match=r"10\.77\.0\.11 is not configured in network namespace"):
        netns.check_node_namespace(node, ip)


# --- kmctl chaos netns -----------------------------------------------------------------------


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(netns_group, list(args), obj=CliContext(config))


@pytest.fixture
def fake_ip(monkeypatch: pytest.MonkeyPatch) -> FakeIp:
    ip = FakeIp()
    monkeypatch.setattr(netns, "system_runner", lambda: ip)
    return ip


def test_cli_round_trip(fake_ip: FakeIp) -> None:
    assert invoke(EXAMPLE, "setup").exit_code == 0
    done = invoke(EXAMPLE, "partition", "km1", "km2", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == {"partitioned": [["km1", "km2"], ["km2", "km1"]]}
    status = json.loads(invoke(EXAMPLE, "status", "--json").output)
    assert status["complete"] and status["partitions"] == [["km1", "km2"], ["km2", "km1"]]
    healed = invoke(EXAMPLE, "heal")
    assert healed.output == "healed km1 -> km2, km2 -> km1\n"
    assert invoke(EXAMPLE, "heal").output == "nothing to heal: no blackhole routes\n"
    torn = invoke(EXAMPLE, "teardown", "--json")
    assert torn.exit_code == 0 and not json.loads(torn.output)["bridge_exists"]


def test_cli_exit_codes(fake_ip: FakeIp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "cluster.yaml"
    plain.write_text("cluster: plain\n")
    done = invoke(plain, "setup")
    assert done.exit_code == EXIT_USAGE and "has `netns` set" in done.output
    assert invoke(EXAMPLE, "partition", "km1", "km1").exit_code == EXIT_USAGE
    assert invoke(EXAMPLE, "partition", "km1", "nope").exit_code == EXIT_USAGE
    done = invoke(EXAMPLE, "partition", "km1", "km2")
    assert done.exit_code == EXIT_FAILURE and "does not exist" in done.output

    def not_root() -> netns.IpRunner:
        raise NetnsError("network namespaces need root")

    monkeypatch.setattr(netns, "system_runner", not_root)
    done = invoke(EXAMPLE, "status")
    assert done.exit_code == EXIT_FAILURE and "need root" in done.output


def test_cli_teardown_refuses_while_nodes_run(
    fake_ip: FakeIp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmnode import supervisor

    record = supervisor.ProcessRecord(1, 1, ("x",))
    monkeypatch.setattr(supervisor, "running", lambda cfg: {"km2": record, "broker": record})
    done = invoke(EXAMPLE, "teardown")
    assert done.exit_code == EXIT_REFUSED and "km2 still running" in done.output
    assert invoke(EXAMPLE, "teardown", "--force").exit_code == 0


def test_every_command_has_help() -> None:
    for name, command in netns_group.commands.items():
        assert command.help and len(command.help) > 20, name
