"""The asyncio reader and the OCALL variant."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kmnode.ring import AsyncReader, OcallWriter, OnFull, Reader, Ring, RingClosed, Writer
from kmnode.ring import _ring as ext
from kmnode.ring.ocall import DEFAULT_SWITCH_CYCLES, cycles_per_second


async def test_async_read_wakes_on_a_write_from_another_thread(small_ring: Ring) -> None:
    w = Writer(small_ring)
    async with AsyncReader(small_ring) as ar:
        assert await ar.read(timeout=0.02) is None
        timer = threading.Timer(0.05, lambda: w.write(b"from a TEE thread", 3))
        timer.start()
        # the loop stays responsive while the read is pending
        ticks = 0
        pending = asyncio.ensure_future(ar.read(timeout=10.0))
        while not pending.done():
            ticks += 1
            await asyncio.sleep(0.005)
        assert await pending == b"from a TEE thread"
        assert ticks >= 3
        timer.join(5)


async def test_async_read_batch_and_iteration(small_ring: Ring) -> None:
    w = Writer(small_ring)
    w.write_batch([b"a", b"b", b"c"])
    async with AsyncReader(small_ring) as ar:
        assert await ar.read_batch(2) == [b"a", b"b"]
        assert await ar.read_batch(timeout=0.01) == [b"c"]
        assert await ar.read_batch(timeout=0.01) == []
        w.write_batch([b"1", b"2"])
        got = []
        async for rec in ar:
            got.append(rec)
            if len(got) == 2:
                break
        assert got == [b"1", b"2"]


async def test_cancelling_a_pending_read_frees_the_worker(small_ring: Ring) -> None:
    w = Writer(small_ring)
    ar = AsyncReader(small_ring)
    task = asyncio.ensure_future(ar.read())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the worker was interrupted, so the next read is served promptly
    w.write(b"next")
    assert await asyncio.wait_for(ar.read(), 5.0) == b"next"
    t0 = time.monotonic()
    ar.close()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(RingClosed):
        await ar.read()


def test_ocall_writer_switches_to_the_host_which_writes(small_ring: Ring) -> None:
    host_writer = Writer(small_ring)
    seen: list[tuple[bytes, int]] = []

    def host_write(data: bytes, rtype: int) -> bool:
        seen.append((data, rtype))
        return host_writer.write(data, rtype, on_full=OnFull.DISCARD)

    tee = OcallWriter(host_write)
    assert tee.switch_cycles == DEFAULT_SWITCH_CYCLES
    buf = bytearray(b"enclave bytes")
    assert tee.write(buf, 4)
    buf[:] = b"changed later"  # the host got a marshalled copy, not enclave memory
    assert seen == [(b"enclave bytes", 4)]
    assert isinstance(seen[0][0], bytes)
    assert tee.calls == 1
    assert Reader(small_ring).read_typed() == (4, b"enclave bytes")


def test_ocall_writer_over_a_writer_and_its_cost(small_ring: Ring) -> None:
    w = Writer(small_ring)
    tee = OcallWriter.over(w, switch_cycles=2_000_000, on_full=OnFull.FAIL)
    c0 = ext.cycle_counter()
    assert tee.write(b"x")
    assert ext.cycle_counter() - c0 >= 2_000_000
    with pytest.raises(ValueError):
        OcallWriter(lambda d, t: True, switch_cycles=-1)
    assert cycles_per_second(0.005) > 1e6


def test_close_wakes_a_wait_that_began_after_its_first_interrupt(small_ring: Ring) -> None:
    """A wait the worker took up but began late (the thread preempted, or waiting for the GIL)
    misses an interrupt issued meanwhile and would sleep until the next record: on a ring
    nobody writes to any more (a replaced service ring), forever, with the event loop stuck
    in close. Modelled here by a worker that begins the wait 50 ms late."""
    ar = AsyncReader(small_ring)

    def late_wait() -> bool:
        time.sleep(0.05)
        return ar.reader.wait_readable(None)

    ar._inflight = ar._executor.submit(late_wait)
    time.sleep(0.005)  # the worker has taken it up: it can no longer be cancelled
    closing = threading.Thread(target=ar.close, daemon=True)
    closing.start()
    closing.join(5)
    assert not closing.is_alive(), "close hung on a wait nobody will ever wake"
    assert ar._inflight.done() and ar._inflight.result() is False
