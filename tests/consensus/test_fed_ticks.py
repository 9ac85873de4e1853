"""Raft time fed from outside (``RaftDriver(fed_ticks=True)``), as a KM enclave gets it from
its host: without ticks nothing times out; a flood of ticks delivered at once counts as no
more than ``MAX_FED_TICKS``, so a host (or a stall) cannot fake an election timeout with one
burst; ticks delivered one per pass elect as the clock would."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from consensus.driver import RaftDriver
from consensus.raft import RaftConfig
from consensus.storage import DurableLog
from tests.consensus.test_driver import Alone, ListMachine

pytestmark = pytest.mark.timeout(30)


async def test_only_fed_ticks_move_raft_time_and_a_burst_counts_as_two(tmp_path: Path) -> None:
    config = RaftConfig(id="a", peers=("a",), election_tick=10)
    log = DurableLog.open(tmp_path, fsync=False)
    driver = RaftDriver(
        config,
        log,
        Alone(),
        ListMachine(),
        tick_interval=0.001,
        rng=random.Random(7),
        fed_ticks=True,
    )
    await driver.start()
    try:
        await asyncio.sleep(0.2)  # 200 of its own tick intervals: it has no clock of its own
        assert not driver.is_leader
        for _ in range(1000):  # a flood in one go, without letting the driver run in between
            driver.tick()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not driver.is_leader  # 1000 ticks at once counted as MAX_FED_TICKS, not 1000
        for _ in range(40):  # one per pass: at most 2 x election_tick elects a lone node
            driver.tick()
            for _ in range(3):
                await asyncio.sleep(0)
            if driver.is_leader:
                break
        assert driver.is_leader
    finally:
        await driver.stop()
