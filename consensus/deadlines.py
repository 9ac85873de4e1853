"""Many request timeouts, one timer.

``asyncio.timeout`` (or ``wait_for``) costs a timer handle pushed on the event loop's heap, and a
cancellation, per call. A node serving thousands of proposals, release waits and service
requests a second, each with a timeout of seconds that almost never fires, spent about a tenth
of the leader's CPU on that alone. Here a timeout is a tuple pushed on a heap of our own, and one
timer, armed only while something is pending, fails the futures whose deadline has passed: a
request may time out up to ``resolution`` seconds late, which no caller of a multi-second
timeout can tell apart from scheduling noise.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

#: Builds the exception a timed-out future gets (called only when one does time out).
ErrorFactory = Callable[[], BaseException]


class Deadlines:
    """Fail watched futures with their error once their timeout has passed."""

    def __init__(self, resolution: float = 0.05) -> None:
        self.resolution = resolution
        self._heap: list[tuple[float, int, asyncio.Future[Any], ErrorFactory]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, future: asyncio.Future[Any], timeout: float, error: ErrorFactory) -> None:
        """Fail ``future`` with ``error()`` if it is not done ``timeout`` seconds from now."""
        loop = future.get_loop()
        heapq.heappush(self._heap, (loop.time() + timeout, next(self._order), future, error))
        if self._timer is None:
            self._timer = loop.call_later(self.resolution, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        heap = self._heap
        now = loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            _, _, future, error = heapq.heappop(heap)
            if not future.done():
                future.set_exception(error())
        if heap:
            self._timer = loop.call_later(self.resolution, self._expire, loop)

    def __len__(self) -> int:
        return len(self._heap)

    def close(self) -> None:
        """Stop the timer; futures still watched are left as they are (their owner fails them)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
