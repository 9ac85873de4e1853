"""Real partitions: a 3-node cluster whose nodes each run in their own network namespace.

The namespaces, veth pairs and bridge are made by kmnode.netns, the nodes started by
the supervisor exactly as `kmctl up` starts them (``ip netns exec``), and a partition is a pair
of blackhole routes: the nodes are not told, the kernel drops their packets. Every run uses
its own cluster name, namespace names and 10.77.X.0/24 subnet, so parallel runs on one machine
do not collide; the fixture always stops the cluster and removes the topology.

Needs root and iproute2. Without them the tests are skipped with the reason, unless CI (or
``KMSIM_REQUIRE_NETNS=1``) makes that a failure (``tests/requirements.py``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kmnode import netns, supervisor
from kmnode.cli import cli
from kmnode.config import load_config
from tests.requirements import unavailable

from .harness import until
from .test_faults import SupervisedCluster

pytestmark = pytest.mark.timeout(300)


def _netns_unavailable() -> str | None:
    """Why this machine cannot run these tests, or None. Probes with a throwaway namespace:
    root in a container without CAP_SYS_ADMIN is still refused."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if ip is None:
        return "`ip` (iproute2) is not installed"
    probe = f"kmsim-probe-{os.getpid()}-{secrets.token_hex(2)}"
    added = subprocess.run([ip, "netns", "add", probe], capture_output=True, text=True, timeout=15)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    subprocess.run([ip, "netns", "del", probe], capture_output=True, timeout=15)
    return None


@pytest.fixture(scope="module")
def netns_available() -> None:
    reason = _netns_unavailable()
    if reason is None:
        return
    unavailable(
        "NETNS",
        f"network namespaces unavailable: {reason}",
        "run as root, apt-get install iproute2",
    )


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.X.0/24 this machine does not route yet (setup would refuse one it does)."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"
    out = subprocess.run(
        [ip, "-j", "-4", "route", "show"], capture_output=True, text=True, timeout=15, check=True
    ).stdout
    used = [ipaddress.IPv4Network(dst, strict=False) for dst, _ in netns.parse_routes(out)]
    for x in random.sample(range(1, 255), 254):
        subnet = ipaddress.IPv4Network(f"10.77.{x}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise AssertionError("every 10.77.X.0/24 is routed on this machine already")


class NetnsCluster(SupervisedCluster):
    """The harness's free ports and API helpers; hosts, namespaces and broker on a bridge."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, nodes=3)
        tag = secrets.token_hex(3)
        subnet = _free_subnet()
        data: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        data["cluster"] = f"nt{tag}"
        data["mqtt"]["embedded_host"] = str(subnet.network_address + 1)
        for i, node in enumerate(data["nodes"]):
            node["host"] = str(subnet.network_address + 11 + i)
            node["netns"] = f"kmt{tag}-{node['name']}"
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = load_config(self.config_path)


@pytest.fixture
def cluster(tmp_path: Path, netns_available: None) -> Iterator[NetnsCluster]:
    c = NetnsCluster(tmp_path)
    try:
        netns.setup(c.config)
        c.up(timeout=90)
        yield c
    finally:
        try:
            c.close()
        finally:
            netns.teardown(c.config)


def test_partitioned_leader_is_replaced_and_heals(cluster: NetnsCluster) -> None:
    cfg = cluster.config
    for name, record in supervisor.running(cfg).items():
        if name == supervisor.BROKER:
            continue
        where = subprocess.run(
            ["ip", "netns", "identify", str(record.pid)], capture_output=True, text=True
        ).stdout.strip()
        assert where == cfg.node(name).netns, (name, where)
    old = cluster.converged(timeout=60)
    old_status = cluster.status(old)
    assert old_status is not None
    old_term = old_status["term"]
    others = cluster.others(old)

    for other in others:
        netns.partition(cfg, old, other)
    cut = netns.status(cfg).partitions()
    assert sorted(cut) == sorted([(old, o) for o in others] + [(o, old) for o in others])

    new: list[str] = []

    def new_leader_with_higher_term() -> bool:
        for name in others:
            status = cluster.status(name)
            if status and status["role"] == "leader" and status["term"] > old_term:
                new.append(name)
                return True
        return False

    until(new_leader_with_higher_term, 60, f"a leader among {others} above term {old_term}", 0.1)
    cluster.create_key("after-partition", among=others)
    code, reply = cluster.api(old, "POST", "/v1/keys", {"name": "on-the-old-leader"})
    assert code in (421, 503, 504), (code, reply)

    netns.heal(cfg)
    assert netns.status(cfg).partitions() == []
    leader = cluster.converged(timeout=90)
    assert leader in cluster.names
    for name in cluster.names:
        code, reply = cluster.api(name, "GET", "/v1/keys/after-partition?linearizable=1")
        assert code == 200, (name, code, reply)
        code, reply = cluster.api(name, "GET", "/v1/keys/on-the-old-leader?linearizable=1")
        assert code == 404, (name, code, reply)


def test_seeded_chaos_run_in_namespaces_finds_no_violation(cluster: NetnsCluster) -> None:
    """The CI matrix's namespace entry: real partitions next to kills, replacement of a node
    with a damaged log (restarted inside its namespace) and host-level partitions."""
    cluster.converged(timeout=60)
    out = cluster.root / "run"
    result = CliRunner().invoke(
        cli,
        # Seed 2's shuffle starts with netns-partition: the assertion below must not depend
        # on how many faults a loaded machine fits into 30 s (seed 6 put it fourth).
        ["-c", str(cluster.config_path), "chaos", "run", "--seed", "2", "--duration", "30",
         "--interval", "1.5", "--faults", "netns-partition,kill,flip-byte,partition",
         "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["valid"] is True and report["first_violation"] is None, report["checks"]
    assert {"no-plaintext-keys", "recovery", "disk-damage-refused"} <= set(report["checks"])
    kinds = {f["fault"] for f in report["faults"]}
    assert "netns-partition" in kinds, kinds
    assert netns.status(cluster.config).partitions() == []  # healed at the end
    cluster.converged(timeout=60)


def test_setup_is_idempotent_and_teardown_leaves_nothing(
    tmp_path: Path, netns_available: None
) -> None:
    cfg = NetnsCluster(tmp_path).config
    topo = netns.topology(cfg)
    try:
        assert netns.setup(cfg).complete
        assert netns.setup(cfg).complete
        netns.partition(cfg, "km1", "km2", one_way=True)
        netns.partition(cfg, "km1", "km2", one_way=True)
        assert netns.status(cfg).partitions() == [("km1", "km2")]
        netns.heal(cfg)
        assert netns.status(cfg).partitions() == []
    finally:
        netns.teardown(cfg)
    assert netns.teardown(cfg).absent
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    for node in topo.nodes:
        assert node.netns not in listed and node.veth not in links
    assert topo.bridge not in links
