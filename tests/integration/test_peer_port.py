"""The peer port of real node processes (the host holds the sockets, the KM enclave process
reads them over the circuit): fuzzed, it stays up, keeps its links, keeps its memory and its
state; and a member removed by proposal loses its links to the others and cannot get them back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.quote import QuoteVerifier
from kmnode.enclave_code import current_measurements
from kmnode.km.enclave import KMEnclave
from kmnode.simhw import HardwareStore
from tests.km.peer_links import KM

from .harness import LocalCluster, running, until
from .peer_fuzzing import Fuzzer

pytestmark = pytest.mark.timeout(240)

ROUNDS = 40
#: Growth of the node's processes' memory (host and KM enclave) the fuzzing may cause.
RSS_BOUND = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("peer-port"), 3) as c:
        yield c


def status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    found = cluster.status(name)
    assert found is not None, f"{name} does not answer /v1/status"
    return found


def settled(cluster: LocalCluster, name: str) -> dict[str, Any]:
    """``name``'s status once its applied index has stopped moving (ledger signatures of the
    start-up entries come a little after them)."""
    seen: list[dict[str, Any]] = [status(cluster, name)]

    def still() -> bool:
        time.sleep(1.5)
        seen.append(status(cluster, name))
        return bool(seen[-1]["applied"] == seen[-2]["applied"])

    until(still, 30, f"{name}'s applied index to settle")
    return seen[-1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def memory(cluster: LocalCluster, name: str) -> int:
    """Resident memory of ``name``'s host process and its KM enclave process."""
    return rss(cluster.procs[name].pid) + rss(status(cluster, name)["km_enclave"]["pid"])


def stranger(cluster: LocalCluster, claims: str) -> KMEnclave:
    """An enclave on hardware the cluster's vendor never certified, claiming a member's name.
    It trusts the cluster's vendor and build (public facts) so it can finish its side of a
    handshake; the node answers its HELLO, then refuses its quote."""
    vendor = VendorRoot(b"another vendor".ljust(32, b"\0"))
    platform = Platform("p-stranger", TcbStatus.UP_TO_DATE, b"s".ljust(32, b"\0"), vendor)
    cluster_vendor = HardwareStore(cluster.config.state_dir / "hardware").vendor_public_key()
    km = KMEnclave(
        claims, platform.enclave(KM), QuoteVerifier(cluster_vendor), bootstrap={"km1": "platform-1"}
    )
    km.state.policy = cluster.config.policy.resolve(current_measurements())
    return km


async def fuzz(cluster: LocalCluster) -> None:
    port = cluster.config.node("km1").peer_port
    fuzzer = Fuzzer(port, "km1", stranger(cluster, "km2"), random.Random(7))
    for round_ in range(ROUNDS):
        batch = [fuzzer.random_bytes(), fuzzer.mutated_hello(), fuzzer.mutated_finish()]
        if round_ % 10 == 0:
            batch += [fuzzer.oversize_flood() for _ in range(4)]
        await asyncio.gather(*batch)
    await fuzzer.half_open_crowd()


def test_a_fuzzed_peer_port_leaves_the_node_up_and_unchanged(cluster: LocalCluster) -> None:
    before = settled(cluster, "km1")
    rss_before = memory(cluster, "km1")
    asyncio.run(fuzz(cluster))
    after = status(cluster, "km1")
    rss_after = memory(cluster, "km1")
    print(f"km1 memory: {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; {after['links']}")
    assert after["ready"] and set(after["peers"]) == {"km2", "km3"}
    assert (after["applied"], after["commit"]) == (before["applied"], before["commit"])
    assert after["links"]["refused"] > before["links"]["refused"]
    assert after["links"]["refused_oversize"] > before["links"]["refused_oversize"]
    assert rss_after - rss_before < RSS_BOUND
    # The cluster still commits through km1.
    code, created = cluster.leader_call("POST", "/v1/keys", {"name": "after-fuzz"})
    assert code == 201, created
    until(lambda: status(cluster, "km1")["applied"] > after["applied"], 15, "km1 applying")


def test_a_removed_member_loses_its_links_and_cannot_make_new_ones(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    gone = [n for n in cluster.names if n != leader][-1]
    stay = [n for n in cluster.names if n != gone]
    revoked = {n: status(cluster, n)["links"]["revoked"] for n in stay}
    assert set(status(cluster, gone)["peers"]) == set(stay)
    code, made = cluster.leader_call("POST", "/v1/members/remove", {"name": gone})
    assert code == 200 and made["state"] == "accepted", made

    until(lambda: status(cluster, gone)["peers"] == {}, 15, f"{gone}'s links closing")
    for name in stay:
        assert status(cluster, name)["links"]["revoked"] > revoked[name]
        assert gone not in status(cluster, name)["peers"]
    # It keeps trying (cluster.yaml still lists the others), and keeps being refused.
    refused = {n: status(cluster, n)["links"]["refused"] for n in stay}
    until(
        lambda: all(status(cluster, n)["links"]["refused"] > refused[n] for n in stay),
        15,
        f"the members refusing {gone} again",
    )
    assert status(cluster, gone)["peers"] == {}
