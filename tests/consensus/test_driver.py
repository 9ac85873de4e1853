"""Driver integration: three drivers in one event loop over real loopback TCP."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from consensus.driver import DriverStopped, RaftDriver
from consensus.progress import ProgressState
from consensus.raft import RaftConfig
from consensus.statemachine import StateMachine
from consensus.storage import DurableLog
from consensus.transport import MessageHandler, TcpTransport, Transport
from consensus.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    Message,
    MessageType,
    NotLeader,
    ProposalDropped,
    ProposalTimeout,
    Ready,
)
from tests.ports import free_port

NAMES = ("a", "b", "c")


class ListMachine:
    """Appends every applied payload; the result of an apply is the new length."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def apply(self, entry: Entry) -> object:
        self.items.append(entry.data)
        return len(self.items)

    def snapshot(self) -> bytes:
        return bytes(msgpack.packb(self.items))

    def restore(self, data: bytes) -> None:
        self.items = list(msgpack.unpackb(data))


class Alone(Transport):
    """The transport of a one-node cluster, which has nobody to send to."""

    async def start(self, handler: MessageHandler) -> None:
        return None

    def send(self, msg: Message) -> None:
        raise AssertionError(f"a one-node cluster sent {msg}")

    async def stop(self) -> None:
        return None


async def until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        if pred():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    """Drivers on loopback TCP, each applying to a fresh ``machine()`` (a ``ListMachine`` unless
    the test brings its own state machine)."""

    def __init__(
        self,
        root: Path,
        snapshot_every: int = 10_000,
        machine: Callable[[], StateMachine] = ListMachine,
    ) -> None:
        self.root = root
        self.snapshot_every = snapshot_every
        self.machine = machine
        self.drivers: dict[str, RaftDriver] = {}
        self.machines: dict[str, Any] = {}
        #: Indexes each node's ``on_append`` hook was shown (since its last start).
        self.appended: dict[str, list[int]] = {}

    async def start(self, name: str, peers: tuple[str, ...] = NAMES) -> RaftDriver:
        transport = TcpTransport(name)
        sm = self.machine()
        appended = self.appended[name] = []
        driver = RaftDriver(
            RaftConfig(id=name, peers=peers),
            DurableLog.open(self.root / name, fsync=True),
            transport,
            sm,
            tick_interval=0.02,
            rng=random.Random(hash(name) + len(self.drivers)),
            snapshot_every=self.snapshot_every,
            on_append=lambda entries: appended.extend(e.index for e in entries),
        )
        await driver.start()
        self.drivers[name] = driver
        self.machines[name] = sm
        for other, d in self.drivers.items():
            if other == name:
                continue
            assert isinstance(d.transport, TcpTransport)
            d.transport.set_peer(name, transport.address)
            transport.set_peer(other, d.transport.address)
        return driver

    async def stop(self, name: str) -> None:
        await self.drivers.pop(name).stop()

    async def close(self) -> None:
        for name in list(self.drivers):
            await self.stop(name)

    async def leader(self, timeout: float = 10.0) -> RaftDriver:
        found: list[RaftDriver] = []

        def one_leader() -> bool:
            found[:] = [d for d in self.drivers.values() if d.is_leader]
            return len(found) == 1 and all(d.leader == found[0].id for d in self.drivers.values())

        await until(one_leader, timeout, "a leader known to every node")
        return found[0]


@pytest.fixture
async def cluster(tmp_path: Path) -> Cluster:
    c = Cluster(tmp_path)
    for n in NAMES:
        await c.start(n)
    try:
        yield c  # type: ignore[misc]
    finally:
        await c.close()


async def test_elect_and_apply_concurrent_proposals_in_same_order(cluster: Cluster) -> None:
    leader = await cluster.leader()
    payloads = [f"p{i}".encode() for i in range(300)]
    results = await asyncio.gather(*(leader.propose(p, timeout=10) for p in payloads))
    assert sorted(results) == list(range(1, 301))  # each got its own apply result
    await until(lambda: all(len(m.items) == 300 for m in cluster.machines.values()), 10, "apply")
    orders = [m.items for m in cluster.machines.values()]
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == sorted(payloads)
    assert leader.stats.fsync_batches < 300  # proposals shared fsyncs (group commit)


async def test_leader_appends_leave_before_its_fsync_and_acks_after_the_followers(
    cluster: Cluster,
) -> None:
    """Pipelining only helps if the leader's appends reach the wire before it blocks on its
    own fsync (a buffering transport would otherwise hold them until after it), and a
    follower may only acknowledge what its own fsync made durable."""
    leader = await cluster.leader()
    await leader.propose(b"warm-up")
    warm = leader.applied_index
    # Both followers acknowledged the warm-up, so the leader streams to both (a follower still
    # being probed would get the next append only after its answer: after the leader's fsync).
    await until(
        lambda: all(
            p.match >= warm and p.state is ProgressState.REPLICATE
            for n, p in leader.status.progress.items()
            if n != leader.id
        ),
        10,
        "both followers to be replicating",
    )
    events: dict[str, list[tuple[str, int]]] = {n: [] for n in cluster.drivers}
    for name, driver in cluster.drivers.items():
        record = events[name].append
        send, flush, persist = driver.transport.send, driver.transport.flush, driver.log.persist

        def recording_send(m: Message, send: Any = send, record: Any = record) -> None:
            if m.type == MessageType.APPEND and m.entries:
                record(("APPEND", m.entries[-1].index))
            elif m.type == MessageType.APPEND_RESP:
                record(("APPEND_RESP", m.index))
            send(m)

        def recording_flush(flush: Any = flush, record: Any = record) -> None:
            record(("flush", 0))
            flush()

        def recording_persist(
            rd: Ready, persist: Any = persist, record: Any = record, **kw: Any
        ) -> None:
            persist(rd, **kw)
            if rd.entries and kw.get("sync", True):
                record(("durable", rd.entries[-1].index))

        driver.transport.send = recording_send  # type: ignore[method-assign]
        driver.transport.flush = recording_flush  # type: ignore[method-assign]
        driver.log.persist = recording_persist  # type: ignore[method-assign]
    await leader.propose(b"x")
    index = leader.applied_index
    await until(
        lambda: all(d.applied_index >= index for d in cluster.drivers.values()), 10, "apply"
    )
    lead = events[leader.id]
    durable = lead.index(("durable", index))
    sent = [i for i, e in enumerate(lead) if e == ("APPEND", index)]
    assert len(sent) == 2 and sent[-1] < durable
    assert ("flush", 0) in lead[sent[-1] : durable]
    for name, seen in events.items():
        if name != leader.id:
            assert seen.index(("durable", index)) < seen.index(("APPEND_RESP", index))


async def test_append_hook_sees_new_entries_but_not_a_catch_up_of_committed_ones(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    follower, lagging = [n for n in NAMES if n != leader.id]
    await cluster.stop(lagging)
    await asyncio.gather(*(leader.propose(b"while %d was down" % i) for i in range(20)))
    missed = set(range(leader.applied_index - 19, leader.applied_index + 1))
    assert missed <= set(cluster.appended[leader.id])
    assert missed <= set(cluster.appended[follower])  # not committed when it got them
    restarted = await cluster.start(lagging)
    await until(lambda: restarted.applied_index >= max(missed), 10, "catch-up")
    # With the other follower down, the new entry cannot commit before the restarted node has
    # it, so it reaches that node uncommitted and the hook must show it. (With both followers
    # up, the leader may commit it first and the restarted node rightly skips it.)
    await cluster.stop(follower)
    await leader.propose(b"after", timeout=10)
    index = leader.applied_index
    await until(lambda: restarted.applied_index >= index, 10, "the new entry")
    assert index in cluster.appended[lagging]
    assert not missed & set(cluster.appended[lagging])  # already committed on arrival


async def test_not_leader_carries_hint(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(d for d in cluster.drivers.values() if not d.is_leader)
    with pytest.raises(NotLeader) as info:
        await follower.propose(b"x")
    assert info.value.leader == leader.id


async def test_leader_failover_and_restart_catch_up(cluster: Cluster) -> None:
    leader = await cluster.leader()
    for i in range(20):
        await leader.propose(b"before%d" % i)
    old = leader.id
    await cluster.stop(old)
    new = await cluster.leader(timeout=10)
    assert new.id != old
    await asyncio.gather(*(new.propose(b"after%d" % i, timeout=10) for i in range(50)))

    restarted = await cluster.start(old)  # same data directory: replays its log
    await until(lambda: len(cluster.machines[old].items) == 70, 10, "restarted node catch-up")
    assert cluster.machines[old].items == cluster.machines[new.id].items
    assert restarted.status.term >= new.status.term - 1


async def test_read_index_on_follower_sees_prior_writes(cluster: Cluster) -> None:
    leader = await cluster.leader()
    await asyncio.gather(*(leader.propose(b"w%d" % i) for i in range(30)))
    follower = next(d for d in cluster.drivers.values() if not d.is_leader)
    applied = await follower.read_index(timeout=5)
    assert applied >= 30
    assert len(cluster.machines[follower.id].items) == 30
    assert await leader.read_index() >= 30


async def test_proposal_times_out_without_quorum(cluster: Cluster) -> None:
    leader = await cluster.leader()
    for name in [n for n in NAMES if n != leader.id]:
        await cluster.stop(name)
    with pytest.raises((ProposalTimeout, NotLeader)):
        await leader.propose(b"lonely", timeout=0.3)


async def test_stop_fails_outstanding_and_refuses_new(cluster: Cluster) -> None:
    leader = await cluster.leader()
    for name in [n for n in NAMES if n != leader.id]:
        await cluster.stop(name)
    pending = asyncio.create_task(leader.propose(b"never", timeout=30))
    await asyncio.sleep(0.05)
    await cluster.stop(leader.id)
    with pytest.raises(DriverStopped):
        await pending
    with pytest.raises(DriverStopped):
        await leader.propose(b"late")


async def test_snapshot_catch_up_after_compaction(tmp_path: Path) -> None:
    c = Cluster(tmp_path, snapshot_every=40)
    try:
        for n in NAMES:
            await c.start(n)
        leader = await c.leader()
        lagging = next(n for n in NAMES if n != leader.id)
        await c.stop(lagging)
        for i in range(5):
            await asyncio.gather(*(leader.propose(b"%d-%d" % (i, j)) for j in range(40)))
        # The leader compacted past what lagging has (snapshots are written in the background).
        await until(lambda: leader.log.snapshot_index >= 120, 10, "the leader's compaction")
        await c.start(lagging)
        await until(lambda: len(c.machines[lagging].items) == 200, 10, "snapshot catch-up")
        assert c.machines[lagging].items == c.machines[leader.id].items
    finally:
        await c.close()


def refused_address() -> tuple[str, int]:
    """A loopback port nobody listens on (bound, then closed)."""
    return ("127.0.0.1", free_port())


async def test_partitioned_leader_proposals_are_dropped(cluster: Cluster) -> None:
    old = await cluster.leader()
    others = [d for d in cluster.drivers.values() if d is not old]
    real = {n: d.transport.address for n, d in cluster.drivers.items()}  # type: ignore[attr-defined]
    nowhere = refused_address()
    for o in others:  # cut the leader off in both directions
        old.transport.set_peer(o.id, nowhere)  # type: ignore[attr-defined]
        o.transport.set_peer(old.id, nowhere)  # type: ignore[attr-defined]
    lost = [asyncio.create_task(old.propose(b"lost%d" % i, timeout=20)) for i in range(5)]
    await until(lambda: any(o.is_leader for o in others), 10, "a leader in the majority")
    new = next(o for o in others if o.is_leader)
    for i in range(3):
        await new.propose(b"kept%d" % i, timeout=10)
    for o in others:  # heal
        old.transport.set_peer(o.id, real[o.id])  # type: ignore[attr-defined]
        o.transport.set_peer(old.id, real[old.id])  # type: ignore[attr-defined]
    outcomes = await asyncio.gather(*lost, return_exceptions=True)
    assert all(isinstance(r, ProposalDropped) for r in outcomes), outcomes
    await until(
        lambda: cluster.machines[old.id].items == cluster.machines[new.id].items,
        10,
        "the old leader converging on the new log",
    )
    assert not any(item.startswith(b"lost") for item in cluster.machines[old.id].items)


async def test_stop_leaves_no_tasks_or_file_descriptors(tmp_path: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before_fds = fds()
    before_tasks = asyncio.all_tasks()
    c = Cluster(tmp_path)
    for n in NAMES:
        await c.start(n)
    leader = await c.leader()
    await asyncio.gather(*(leader.propose(b"x%d" % i) for i in range(20)))
    assert fds() > before_fds
    await c.close()
    await asyncio.sleep(0.05)  # let closed transports run their final callbacks
    assert asyncio.all_tasks() == before_tasks
    assert fds() == before_fds


async def test_storage_failure_stops_the_driver_loudly(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    leader = await cluster.leader()
    leader.log.close()  # every later write fails
    with pytest.raises(DriverStopped, match="failed"):
        await leader.propose(b"x", timeout=5)
    assert "raft loop failed" in caplog.text
    with pytest.raises(DriverStopped):
        await leader.propose(b"y")


async def test_membership_change_adds_a_voter_that_catches_up(cluster: Cluster) -> None:
    leader = await cluster.leader()
    await asyncio.gather(*(leader.propose(b"old%d" % i) for i in range(30)))
    await cluster.start("d", peers=())  # a joiner learns the membership from the leader
    await leader.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, "d"), timeout=10)
    assert "d" in leader.status.conf.voters
    await leader.propose(b"new", timeout=10)
    await until(
        lambda: cluster.machines["d"].items == cluster.machines[leader.id].items,
        10,
        "the new voter catching up",
    )
    assert cluster.machines["d"].items[-1] == b"new"
    assert "d" in cluster.drivers["d"].status.conf.voters
