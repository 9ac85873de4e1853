"""One timer for many timeouts: expired futures fail, finished ones are left alone."""

from __future__ import annotations

import asyncio

import pytest

from consensus.deadlines import Deadlines


class Expired(Exception):
    """The error a watched future gets when its time is up."""


async def test_a_future_not_done_in_time_fails_with_its_error() -> None:
    deadlines = Deadlines(resolution=0.01)
    loop = asyncio.get_running_loop()
    slow: asyncio.Future[int] = loop.create_future()
    quick: asyncio.Future[int] = loop.create_future()
    deadlines.watch(slow, 0.02, lambda: Expired("slow"))
    deadlines.watch(quick, 0.02, lambda: Expired("quick"))
    quick.set_result(7)
    with pytest.raises(Expired, match="slow"):
        await asyncio.wait_for(slow, 5.0)
    assert quick.result() == 7
    deadlines.close()


async def test_a_long_timeout_does_not_fire_with_a_short_one() -> None:
    deadlines = Deadlines(resolution=0.01)
    loop = asyncio.get_running_loop()
    short: asyncio.Future[None] = loop.create_future()
    long: asyncio.Future[None] = loop.create_future()
    deadlines.watch(long, 60.0, lambda: Expired("long"))
    deadlines.watch(short, 0.01, lambda: Expired("short"))
    with pytest.raises(Expired):
        await asyncio.wait_for(short, 5.0)
    assert not long.done() and len(deadlines) == 1
    deadlines.close()
    assert len(deadlines) == 0 and not long.done()


async def test_the_timer_stops_once_nothing_is_pending() -> None:
    deadlines = Deadlines(resolution=0.01)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    for future in futures:
        deadlines.watch(future, 0.01, lambda: Expired())
    await asyncio.gather(*futures, return_exceptions=True)
    for _ in range(100):  # bounded: the last sweep runs one resolution later at most
        if deadlines._timer is None:
            break
        await asyncio.sleep(0.01)
    assert deadlines._timer is None and len(deadlines) == 0
