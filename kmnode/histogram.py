"""A fixed-bucket latency histogram: what ``GET /metrics`` reports as a Prometheus histogram.

Both halves of a node keep one where a duration is already measured (the host's fsyncs, the
KM enclave's releases): an observation is one bisect and one increment, and nothing else
happens until a scrape reads the counts. Pure, no locks: each lives on one event loop.
"""

from __future__ import annotations

import bisect
import math

#: Upper bounds (seconds) from 0.1 ms to 10 s: an fsync on a fast disk up to a stalled release.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        #: Observations per bucket (not cumulative); the last one is above every bound.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf: Prometheus's form."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
