"""Background snapshots (the state machine is captured between applies, serialised and written
in a worker thread while the node keeps committing, and the log is compacted afterwards), and
persists inline or in the thread depending on how fast the disk is."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from consensus import driver as driver_module
from consensus.driver import RaftDriver
from consensus.raft import RaftConfig
from consensus.storage import DurableLog
from consensus.transport import TcpTransport
from consensus.types import Ready
from tests.consensus.test_driver import ListMachine, until


class SlowCaptureMachine(ListMachine):
    """Offers ``snapshot_capture``; serialising blocks until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.captured_in: list[str] = []
        self.captured: list[int] = []  #: how many items each capture held
        self.serialised_in: list[str] = []

    def snapshot_capture(self) -> Callable[[], bytes]:
        self.captured_in.append(threading.current_thread().name)
        items = list(self.items)
        self.captured.append(len(items))

        def serialise() -> bytes:
            self.serialised_in.append(threading.current_thread().name)
            assert self.release.wait(10)
            return bytes(msgpack.packb(items))

        return serialise


def single(root: Path, sm: ListMachine, snapshot_every: int) -> RaftDriver:
    return RaftDriver(
        RaftConfig(id="a", peers=("a",)),
        DurableLog.open(root, fsync=True),
        TcpTransport("a"),
        sm,
        tick_interval=0.02,
        rng=random.Random(1),
        snapshot_every=snapshot_every,
    )


async def test_commits_go_on_while_a_snapshot_is_serialised_then_the_log_compacts(
    tmp_path: Path,
) -> None:
    sm = SlowCaptureMachine()
    driver = single(tmp_path, sm, snapshot_every=20)
    await driver.start()
    try:
        driver.campaign()
        await until(lambda: driver.is_leader, 5, "leadership")
        for i in range(25):
            await driver.propose(b"%d" % i)
        await until(lambda: bool(sm.serialised_in), 5, "a snapshot being serialised")
        # The serialiser is blocked in its thread: the loop keeps committing meanwhile.
        for i in range(25, 40):
            assert await driver.propose(b"%d" % i, timeout=2.0) == i + 1
        assert driver.log.snapshot_index == 0
        sm.release.set()
        await until(lambda: driver.log.snapshot_index > 0, 5, "compaction")
        index = driver.log.snapshot_index
        # Captured between two applies, once the first 20 indexes (index 1: the no-op) were.
        assert 19 <= sm.captured[0] <= 25
        assert sm.captured_in[0] == threading.main_thread().name
        assert sm.serialised_in[0] != threading.main_thread().name
    finally:
        sm.release.set()
        await driver.stop()
    # The newest snapshot holds exactly the entries applied when it was captured.
    restarted = ListMachine()
    log = DurableLog.open(tmp_path, fsync=True)
    assert log.initial_state.snapshot.meta.index >= index
    restarted.restore(log.initial_state.snapshot.data)
    assert len(restarted.items) == log.initial_state.snapshot.meta.index - 1
    assert restarted.items == sm.items[: len(restarted.items)]
    log.close()
    again = ListMachine()
    driver = single(tmp_path, again, snapshot_every=20)
    await driver.start()
    try:
        driver.campaign()
        await until(lambda: len(again.items) == 40, 5, "replay after the snapshot")
        assert again.items == sm.items
    finally:
        await driver.stop()


class BigImageMachine(ListMachine):
    """A state whose image (50 kB) is far larger than the entries that built it."""

    def snapshot(self) -> bytes:
        return bytes(msgpack.packb(self.items)) + bytes(50_000)


async def test_snapshots_wait_until_the_log_outgrows_the_last_one(tmp_path: Path) -> None:
    sm = BigImageMachine()
    driver = single(tmp_path, sm, snapshot_every=10)
    await driver.start()
    try:
        driver.campaign()
        await until(lambda: driver.is_leader, 5, "leadership")
        for _ in range(12):
            await driver.propose(b"x" * 100)
        await until(lambda: driver.log.snapshot_index > 0, 5, "the first snapshot")
        first = driver.log.snapshot_index
        # 10 more entries are due by count, but the log since is far smaller than 50 kB.
        for _ in range(30):
            await driver.propose(b"y" * 100)
        await asyncio.sleep(0.2)
        assert driver.log.snapshot_index == first
        # Once the log since the snapshot is as large as it, the next one is taken.
        for _ in range(20):
            await driver.propose(b"z" * 4000)
        await until(lambda: driver.log.snapshot_index > first, 5, "the second snapshot")
    finally:
        await driver.stop()


async def test_persists_run_inline_while_fsyncs_are_fast_and_in_the_thread_when_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast disk is written inline (no thread hand-off on the commit path); a slow one from
    the worker thread, so the event loop is not stalled for the length of an fsync."""
    sm = ListMachine()
    driver = single(tmp_path, sm, snapshot_every=0)
    threads: list[str] = []
    persist = driver.log.persist

    def recording_persist(rd: Ready, *, sync: bool = True) -> None:
        if sync and rd.entries:
            threads.append(threading.current_thread().name)
        persist(rd, sync=sync)

    monkeypatch.setattr(driver.log, "persist", recording_persist)
    await driver.start()
    try:
        driver.campaign()
        await until(lambda: driver.is_leader, 5, "leadership")
        monkeypatch.setattr(driver_module, "INLINE_FSYNC_S", 10.0)  # any disk is "fast"
        for i in range(10):
            await driver.propose(b"%d" % i)
        assert threads[-5:] == [threading.main_thread().name] * 5
        monkeypatch.setattr(driver_module, "INLINE_FSYNC_S", 0.0)  # any disk is "slow"
        threads.clear()
        for i in range(10):
            await driver.propose(b"%d" % i)
        assert threading.main_thread().name not in threads[-5:]
        assert 0 < driver.fsync_avg_s < 10.0
        assert len(sm.items) == 20
    finally:
        await driver.stop()
