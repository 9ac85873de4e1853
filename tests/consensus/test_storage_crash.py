"""Power-cut simulation: a child appends and fsyncs, reports each ack, and is SIGKILLed.

Every entry the child acknowledged (printed after ``append`` returned) must be on disk after the
kill, in order, with its data, and the log must reopen (any half-written tail is truncated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consensus.storage import DurableLog

CHILD = r"""
import sys
from consensus.storage import DurableLog
from consensus.types import Entry, HardState
log = DurableLog.open(sys.argv[1], segment_bytes=int(sys.argv[2]))
i = log.last_index
out = sys.stdout
while i < 100000:
    batch = [Entry(7, j, data=b"%d" % j * 20) for j in range(i + 1, i + 4)]
    log.append(batch, HardState(7, "me", i))
    i += 3
    out.write("%d\n" % i)
    out.flush()
"""


def run_and_kill(data: Path, acks_before_kill: int, segment_bytes: int) -> int:
    """Run the child until it acked ``acks_before_kill`` batches, SIGKILL it, return last ack."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(segment_bytes)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    last = 0
    deadline = time.monotonic() + 30
    try:
        for _ in range(acks_before_kill):
            line = child.stdout.readline()
            assert line, "child died early"
            last = int(line)
            assert time.monotonic() < deadline
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # Acks already in the pipe were printed after their fsync: they count too.
        for line in child.stdout.read().splitlines():
            last = int(line)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        child.stdout.close()
    return last


@pytest.mark.parametrize("segment_bytes", [64 * 1024 * 1024, 2048])
def test_acknowledged_entries_survive_kill(tmp_path: Path, segment_bytes: int) -> None:
    acked = 0
    for round_, kill_after in enumerate((40, 7, 150)):
        acked = max(acked, run_and_kill(tmp_path, kill_after, segment_bytes))
        with DurableLog.open(tmp_path, segment_bytes=segment_bytes) as log:
            got = log.initial_state.entries
            assert len(got) >= acked, f"round {round_}: lost acknowledged entries"
            for pos, e in enumerate(got, start=1):
                assert (e.index, e.term, e.data) == (pos, 7, b"%d" % pos * 20)
            assert log.initial_state.hard_state.term == 7
