"""A periodic timer on the event loop that does not catch up.

Raft's clock is a count of ticks. After a stall (a long fsync, a paused process, a busy loop)
replaying every missed tick at once would look like an election timeout and start a needless
election, so a ``Ticker`` skips what it missed and goes on from now. The Raft driver ticks
itself with one; a KM node's host feeds its enclave ticks with one (an enclave has no clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Ticker:
    """Call ``fn`` every ``interval`` seconds on the running loop, from ``start`` to ``stop``."""

    def __init__(self, interval: float, fn: Callable[[], None]) -> None:
        self.interval = interval
        self._fn = fn
        self._next = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._next = loop.time() + self.interval
        self._handle = loop.call_at(self._next, self._fire)

    def _fire(self) -> None:
        self._fn()
        if self._handle is None:  # stopped by ``fn``
            return
        loop = asyncio.get_running_loop()
        self._next += self.interval
        now = loop.time()
        if self._next < now:  # the loop was stalled: do not replay a burst
            self._next = now + self.interval
        self._handle = loop.call_at(self._next, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
