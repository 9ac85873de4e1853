"""An asyncio reader for the host's event loop.

The event loop must never block on the ring, and must not poll it either.  A wait for data is
a futex sleep in the extension (the GIL released), so it runs on one dedicated worker thread
and the coroutine awaits its future: the loop is woken by the writer's own futex wake, relayed
through `call_soon_threadsafe`, and sits idle (no timer, no polling) while the ring is empty.
Records themselves are taken on the loop thread with non-blocking reads.

The AsyncReader has a Reader of its own, so that cancelling a wait (which interrupts the
worker's futex sleep) cannot disturb other readers of the same ring in this process.

An interrupt wakes a wait already asleep, not one the worker has yet to begin: a wait
cancelled just after it was handed to the worker would then sleep until the next record,
forever on a ring nobody writes to any more, and `close` (on the event loop) with it. So
`close` interrupts again until the worker's wait has ended, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from kmnode.ring._ring import Reader, Ring
from kmnode.ring.errors import RingClosed

#: How often, and how many times, `close` interrupts a wait that has not ended yet.
CLOSE_INTERRUPT_EVERY = 0.005
CLOSE_INTERRUPTS = 400


class AsyncReader:
    """Awaitable reads from a ring: `await ar.read()`, `await ar.read_batch()`, `async for`."""

    def __init__(self, ring: Ring, *, lock_timeout: float | None = 5.0, batch: int = 4096) -> None:
        self._reader = Reader(ring, lock_timeout=lock_timeout)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmring-wait")
        self._batch = batch
        self._closed = False
        #: The wait handed to the worker last (close makes sure it has ended).
        self._inflight: concurrent.futures.Future[bool] | None = None

    @property
    def reader(self) -> Reader:
        return self._reader

    async def _wait(self, timeout: float | None) -> bool:
        if self._closed:
            raise RingClosed("AsyncReader is closed")
        self._inflight = self._executor.submit(self._reader.wait_readable, timeout)
        try:
            return await asyncio.wrap_future(self._inflight)
        except asyncio.CancelledError:
            # Free the worker thread now rather than when data next arrives.
            self._reader.interrupt()
            raise

    async def read(self, timeout: float | None = None) -> bytes | None:
        """Next payload; None if `timeout` seconds pass first (None: wait as long as it takes)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            record = self._reader.read()
            if record is not None:
                return record
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            await self._wait(remaining)

    async def read_batch(
        self, max_records: int | None = None, timeout: float | None = None
    ) -> list[bytes]:
        """Up to max_records payloads, waiting for at least one (empty list on timeout)."""
        loop = asyncio.get_running_loop()
        limit = self._batch if max_records is None else max_records
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            records = self._reader.read_batch(limit)
            if records:
                return records
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            await self._wait(remaining)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self._closed:
            for record in await self.read_batch():
                yield record

    def close(self) -> None:
        """Stop: wake the worker out of its futex sleep and let its thread end."""
        if self._closed:
            return
        self._closed = True
        inflight = self._inflight
        for _ in range(CLOSE_INTERRUPTS):
            self._reader.interrupt()
            if inflight is None or inflight.cancel() or inflight.done():
                break
            concurrent.futures.wait([inflight], timeout=CLOSE_INTERRUPT_EVERY)
        # A worker still asleep after all that is left behind rather than block the loop.
        self._executor.shutdown(wait=inflight is None or inflight.done(), cancel_futures=True)

    async def __aenter__(self) -> AsyncReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
