"""The KM enclave's files held by its host (``kmnode.km.host_disk`` <-> ``kmnode.host.disks``).

Both sides of a real circuit in one process. What an operator relies on: Raft acknowledges an
entry only once the host said it is fsynced; what the host gives back is checked (a record it
changed, a log it took from another node, a file that never ends); a host that fails a write
stops the node rather than leave a hole; and the enclave cannot make the host touch a file
outside the node's directories.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest

from consensus.disk import DiskError, LocalDisk, check_name
from consensus.driver import DriverStopped, RaftDriver
from consensus.raft import RaftConfig
from consensus.segments import encode_record, read_records
from consensus.storage import DurableLog, TamperedLogError
from consensus.types import Entry, EntryType, HardState
from kmnode.circuit import Circuit
from kmnode.host.disks import HostDisks
from kmnode.km.host_disk import HostDisk
from kmnode.km_messages import (
    CircuitError,
    DiskBarrier,
    DiskList,
    DiskOp,
    DiskRead,
    Failed,
    Notice,
    Reply,
    Request,
    decode,
    encode,
)
from kmnode.ring import Ring
from tests.consensus.test_driver import Alone, ListMachine

pytestmark = pytest.mark.timeout(60)


class Key:
    """A record-authentication key, as the enclave's log key is (``consensus.recordauth``)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def tag(self, data: bytes) -> bytes:
        import hashlib

        return hashlib.blake2b(data, key=self.secret, digest_size=16).digest()


MINE, THEIRS = Key(b"m" * 32), Key(b"t" * 32)


class Host:
    """The host's end: serves ``HostDisks`` for a node directory under ``root``; a barrier
    waits while ``hold`` is clear (a slow fsync), so a test can see what waits for it."""

    def __init__(self, root: Path, disks: HostDisks) -> None:
        self.root = root
        self.disks = disks
        self.hold = asyncio.Event()
        self.hold.set()
        self.barriers = 0

    async def on_request(self, request: Request) -> Reply:
        assert isinstance(request, DiskBarrier | DiskList | DiskRead)
        if isinstance(request, DiskBarrier):
            await self.hold.wait()
            self.barriers += 1
        return await self.disks.serve(request)

    def on_notice(self, notice: Notice) -> None:
        assert isinstance(notice, DiskOp)
        self.disks.on_notice(notice)


class Pair:
    """A circuit whose host side serves a node's files and whose enclave side has ``disk``."""

    def __init__(self, root: Path, disks: HostDisks | None = None) -> None:
        tag = f"{os.getpid()}-{id(self)}"
        self.rings = [
            # Both sides share one event loop here, so a full ring could not drain: room for
            # every test's bytes (the node's two processes wait for each other instead).
            Ring.create(f"/kmsim-test-da-{tag}", 16 << 20),
            Ring.create(f"/kmsim-test-db-{tag}", 16 << 20),
        ]
        self.host = Host(root, disks or HostDisks(root, root / "raft"))
        to_enclave, to_host = os.pipe(), os.pipe()
        self.fds = [*to_enclave, *to_host]
        self.host_side = Circuit(
            self.rings[1], self.rings[0], bell_in=to_host[0], bell_out=to_enclave[1],
            on_request=self.host.on_request, on_notice=self.host.on_notice,
        )  # fmt: skip
        self.enclave_side = Circuit(
            self.rings[0], self.rings[1], bell_in=to_enclave[0], bell_out=to_host[1],
            on_request=self.refuse, on_notice=lambda notice: None,
        )  # fmt: skip
        self.host_side.start()
        self.enclave_side.start()
        loop = asyncio.get_running_loop()
        self.raft = HostDisk(self.enclave_side, "raft", root / "raft", loop)
        self.node = HostDisk(self.enclave_side, "node", root, loop)

    async def refuse(self, request: Request) -> Reply:
        raise Failed.of("bad_request", "the enclave serves nothing here")

    async def close(self) -> None:
        await self.enclave_side.close()
        await self.host_side.close()
        await self.host.disks.close()
        for ring in self.rings:
            ring.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        await p.close()


def entries(first: int, count: int, size: int = 10) -> list[Entry]:
    return [
        Entry(1, i, EntryType.NORMAL, bytes([i % 251]) * size) for i in range(first, first + count)
    ]


async def open_log(disk: HostDisk | LocalDisk, auth: Key = MINE) -> DurableLog:
    log = await asyncio.to_thread(DurableLog.open, disk, fsync=True, auth=auth)
    await log.durable()
    return log


async def test_records_round_trip_through_the_host_and_only_the_host_writes(
    pair: Pair, tmp_path: Path
) -> None:
    log = await open_log(pair.raft)
    log.append(entries(1, 50, size=100_000), HardState(term=1, vote="a", commit=3))  # 5 MB
    await log.durable()
    log.close()
    # The host's directory holds the log, tagged: the same key reads it back directly...
    on_disk = DurableLog.open(tmp_path / "raft", fsync=False, auth=MINE)
    assert [e.index for e in on_disk.initial_state.entries] == list(range(1, 51))
    on_disk.close()
    # ...and through the host again, in pieces larger than one circuit record.
    again = await open_log(pair.raft)
    assert again.initial_state.entries[-1].data == bytes([50]) * 100_000
    assert again.initial_state.hard_state == HardState(term=1, vote="a", commit=3)
    again.close()


async def test_a_record_the_host_changed_or_a_log_it_swapped_in_is_refused(
    pair: Pair, tmp_path: Path
) -> None:
    log = await open_log(pair.raft)
    log.append(entries(1, 5), HardState(term=1, vote="a", commit=5))
    await log.durable()
    log.close()
    segment = next((tmp_path / "raft").glob("wal-*.log"))
    records, damage = read_records(segment.read_bytes())
    assert damage is None and len(records) > 4
    payloads = [framed for _, framed in records]
    payloads[3] = payloads[3][:-20] + bytes([payloads[3][-20] ^ 1]) + payloads[3][-19:]
    # Framed afresh, so every length and checksum is right: only the enclave's tag can tell.
    segment.write_bytes(b"".join(encode_record(p) for p in payloads))
    with pytest.raises(TamperedLogError, match="tag does not verify"):
        await open_log(pair.raft)
    # Another node's log, written under its own key, is refused by name.
    segment.unlink()
    foreign = LocalDisk(tmp_path / "raft")
    theirs = DurableLog.open(foreign, fsync=False, auth=THEIRS)
    theirs.append(entries(1, 3), HardState(term=1, vote="x", commit=3))
    theirs.close()
    with pytest.raises(TamperedLogError, match=r"tag does not verify|chain"):
        await open_log(pair.raft)


async def test_raft_acknowledges_an_entry_only_after_the_host_confirms_it(pair: Pair) -> None:
    log = await open_log(pair.raft)
    driver = RaftDriver(
        RaftConfig(id="a", peers=("a",)), log, Alone(), ListMachine(), tick_interval=0.01,
        rng=random.Random(1),
    )  # fmt: skip
    await driver.start()
    try:
        driver.campaign()
        await driver.propose(b"first", timeout=10)
        pair.host.hold.clear()  # the host's fsync takes its time
        proposal = asyncio.ensure_future(driver.propose(b"second", timeout=10))
        await asyncio.sleep(0.3)
        assert not proposal.done()  # written, not yet confirmed durable: not acknowledged
        pair.host.hold.set()
        await asyncio.wait_for(proposal, 10)
        assert pair.host.barriers >= 2
    finally:
        await driver.stop()


async def test_a_write_the_host_fails_stops_raft_and_nothing_after_it_is_written(
    tmp_path: Path,
) -> None:
    disks = Failing(tmp_path, tmp_path / "raft", fail=lambda op: op.kind == "sync")
    p = Pair(tmp_path, disks)
    try:
        log = await asyncio.to_thread(DurableLog.open, p.raft, fsync=True, auth=MINE)
        with pytest.raises(DiskError, match="could not store"):
            await log.durable()
        segment = next((tmp_path / "raft").glob("wal-*.log"))
        size = segment.stat().st_size
        log.append(entries(1, 2), HardState(term=1, vote="a", commit=0))
        with pytest.raises(DiskError, match="sync raft/wal"):
            await log.durable()
        assert segment.stat().st_size == size  # nothing after the failed fsync was written
        driver = RaftDriver(RaftConfig(id="a", peers=("a",)), log, Alone(), ListMachine())
        await driver.start()
        driver.campaign()
        with pytest.raises(DriverStopped):
            await driver.propose(b"lost?", timeout=5)
        await driver.stop()
    finally:
        await p.close()


async def test_reads_on_the_event_loop_are_refused_not_deadlocked(pair: Pair) -> None:
    with pytest.raises(DiskError, match="off the event loop"):
        pair.node.listing()
    assert await asyncio.to_thread(pair.node.listing) == {}


async def test_a_host_that_never_ends_a_file_is_refused(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmnode.km.host_disk as host_disk

    monkeypatch.setattr(host_disk, "MAX_FILE_BYTES", 1 << 20)
    (tmp_path / "big").write_bytes(b"x" * (2 << 20))
    with pytest.raises(DiskError, match="larger than"):
        await asyncio.to_thread(pair.node.read, "big")
    with pytest.raises(DiskError, match="could not read"):
        await asyncio.to_thread(pair.node.read, "missing")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 101, "/etc/passwd"])
def test_the_enclave_cannot_name_a_file_outside_its_directories(name: str) -> None:
    with pytest.raises(DiskError):
        check_name(name)
    record = encode(DiskOp(area="raft", kind="append", name="ok", data=b"x"))
    raw = msgpack.unpackb(record)
    raw["name"] = name
    with pytest.raises(CircuitError):
        decode(msgpack.packb(raw))
    raw["name"], raw["area"] = "ok", "etc"
    with pytest.raises(CircuitError):
        decode(msgpack.packb(raw))


async def test_sealed_state_is_replaced_whole_and_a_barrier_covers_both_directories(
    pair: Pair, tmp_path: Path
) -> None:
    blob = os.urandom(700_000)  # several circuit records: staged, then replaced at once
    pair.node.replace("enclave.sealed", blob, sync=True)
    await pair.raft.durable()  # one queue: the raft directory's barrier covers it
    assert (tmp_path / "enclave.sealed").read_bytes() == blob
    assert not list(tmp_path.glob("*.tmp"))
    assert await asyncio.to_thread(pair.node.read, "enclave.sealed") == blob


# --- helpers -------------------------------------------------------------------------------------


class Failing(HostDisks):
    """A host whose disk fails the operations ``fail`` picks (EIO, a full disk)."""

    def __init__(self, node: Path, raft: Path, fail: Callable[[DiskOp], bool]) -> None:
        super().__init__(node, raft)
        self.fail = fail

    def _apply(self, op: DiskOp) -> None:
        if self._failed is None and self.fail(op):
            self._failed = f"{op.kind} {op.area}/{op.name}: [Errno 5] Input/output error"
            return
        super()._apply(op)


class Slow(HostDisks):
    """A host whose writes take their time in the thread, recording when each is done."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, root / "raft")
        self.events: list[str] = []

    def _apply(self, op: DiskOp) -> None:
        if op.kind == "sync":
            import time

            time.sleep(0.05)  # a slow fsync, in the worker thread
        super()._apply(op)
        self.events.append(f"{op.kind} {op.name}")


async def test_a_send_queued_after_a_slow_write_leaves_only_once_it_is_done(
    tmp_path: Path,
) -> None:
    """A follower's acknowledgement leaves right behind its write, so the host must not send it
    before that write is done: with the disk slow (the thread), it waits; with it fast, the
    write is done on the spot and the send follows at once."""
    disks = Slow(tmp_path)
    try:
        assert disks.fsync_avg_s >= 0.002  # starts pessimistic: operations go to the thread
        disks.on_notice(DiskOp(area="raft", kind="append", name="wal", data=b"entry"))
        disks.on_notice(DiskOp(area="raft", kind="sync", name="wal"))
        disks.after_writes(lambda: disks.events.append("send ack"))
        disks.after_writes(lambda: disks.events.append("send next"))
        assert disks.events == []  # nothing sent while the write is in the thread
        for _ in range(1000):  # bounded: 10 s at most, for a loaded machine
            if len(disks.events) == 4:
                break
            await asyncio.sleep(0.01)
        assert disks.events == ["append wal", "sync wal", "send ack", "send next"]
        assert (tmp_path / "raft" / "wal").read_bytes() == b"entry"
        disks.fsync_avg_s = 0.0001  # a fast disk: done on the loop, in order, at once
        disks.events.clear()
        disks.on_notice(DiskOp(area="raft", kind="append", name="wal", data=b"more"))
        disks.after_writes(lambda: disks.events.append("send ack"))
        assert disks.events == ["append wal", "send ack"]
    finally:
        await disks.close()
