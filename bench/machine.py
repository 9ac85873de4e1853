"""What machine a benchmark ran on: every result must say so next to its figures."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_probe_ms(rounds: int = 5) -> float:
    """Median time of a fixed pure-Python loop (2 * 10**5 additions), in ms.

    The benchmark VM's vCPUs run at speeds that drift by up to 2x within minutes (a noisy host):
    figures taken minutes apart are only comparable next to this probe, taken with them.
    """
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
