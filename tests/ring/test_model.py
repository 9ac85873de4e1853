"""Stateful property test: the ring against a plain Python model of a bounded record queue.

The model knows only framing arithmetic (record_size), FIFO order and the three full-ring
policies; hypothesis drives any interleaving of single and batch writes, single, batch and
zero-copy reads, waits on a full ring, discards, and records that wrap around the end.
"""

from __future__ import annotations

import threading
from collections import deque

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kmnode.ring import OnFull, Reader, RecordTooLarge, Ring, RingFull, Writer, record_size
from tests.ring.conftest import unique_name

CAP = 4096
MAX_RECORD = 700

payloads = st.binary(min_size=200, max_size=MAX_RECORD) | st.binary(max_size=40)
modes = st.sampled_from([OnFull.FAIL, OnFull.DISCARD, OnFull.WAIT])


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring.create(unique_name("model"), CAP, max_record=MAX_RECORD)
        self.writer = Writer(self.ring, lock_timeout=5.0)
        self.reader = Reader(self.ring)
        self.queue: deque[tuple[int, bytes]] = deque()
        self.used = 0
        self.discarded = 0
        self.written_bytes = 0

    # -- model helpers
    def fits(self, payload: bytes) -> bool:
        return self.used + record_size(len(payload)) <= CAP

    def push(self, rtype: int, payload: bytes) -> None:
        if (self.written_bytes % CAP) + record_size(len(payload)) > CAP:
            event("a record wrapped around the end")
        self.queue.append((rtype, payload))
        self.used += record_size(len(payload))
        self.written_bytes += record_size(len(payload))

    def pop(self) -> tuple[int, bytes]:
        rtype, payload = self.queue.popleft()
        self.used -= record_size(len(payload))
        return rtype, payload

    @initialize(start=st.integers(0, CAP // 8 - 1))
    def start_anywhere(self, start: int) -> None:
        """Begin at an arbitrary position so that records soon straddle the end of the data."""
        fillers = [b""] * start
        assert self.writer.write_batch(fillers) == start
        assert self.reader.read_batch(CAP) == fillers
        self.written_bytes += 8 * start

    # -- writes
    @rule(payload=payloads, rtype=st.integers(0, 2**32 - 1), mode=modes)
    def write(self, payload: bytes, rtype: int, mode: OnFull) -> None:
        if self.fits(payload):
            assert self.writer.write(payload, rtype, on_full=mode, timeout=0.0) is True
            self.push(rtype, payload)
        elif mode == OnFull.DISCARD:
            assert self.writer.write(payload, rtype, on_full=mode) is False
            self.discarded += 1
        else:
            with pytest.raises(RingFull):
                self.writer.write(payload, rtype, on_full=mode, timeout=0.0)

    @rule(size=st.integers(MAX_RECORD + 1, 3 * CAP))
    def write_too_large(self, size: int) -> None:
        with pytest.raises(RecordTooLarge):
            self.writer.write(b"x" * size, on_full=OnFull.DISCARD)

    @rule(batch=st.lists(payloads, max_size=12), rtype=st.integers(0, 9), mode=modes)
    def write_batch(self, batch: list[bytes], rtype: int, mode: OnFull) -> None:
        expected = 0
        stopped = False
        for payload in batch:
            if self.fits(payload):
                self.push(rtype, payload)
                expected += 1
            elif mode == OnFull.DISCARD:
                self.discarded += 1
            else:
                stopped = True
                break
        if stopped:
            with pytest.raises(RingFull) as err:
                self.writer.write_batch(batch, rtype, on_full=mode, timeout=0.0)
            assert err.value.written == expected
        else:
            assert self.writer.write_batch(batch, rtype, on_full=mode, timeout=0.0) == expected

    @precondition(lambda self: self.queue)
    @rule(payload=payloads)
    def wait_for_space(self, payload: bytes) -> None:
        """A WAIT write on a ring too full for it completes once another thread reads."""
        if self.fits(payload):
            if CAP - self.used > MAX_RECORD:
                return
            payload = b"w" * (CAP - self.used)  # its frame makes it 8+ bytes too big
        drained: list[list[tuple[int, bytes]]] = []

        def drain() -> None:
            drained.append(self.reader.read_batch_typed(10_000))

        timer = threading.Timer(0.005, drain)
        timer.start()
        assert self.writer.write(payload, 1, on_full=OnFull.WAIT, timeout=30.0)
        timer.join(30)
        expected = [self.pop() for _ in range(len(self.queue))]
        assert drained == [expected]
        self.push(1, payload)

    # -- reads
    @rule()
    def read(self) -> None:
        got = self.reader.read()
        if self.queue:
            assert got == self.pop()[1]
        else:
            assert got is None

    @rule()
    def read_typed(self) -> None:
        got = self.reader.read_typed()
        assert got == (self.pop() if self.queue else None)

    @rule(limit=st.integers(1, 20))
    def read_batch(self, limit: int) -> None:
        expected = [self.pop() for _ in range(min(limit, len(self.queue)))]
        assert self.reader.read_batch_typed(limit) == expected

    @rule(limit=st.integers(1, 20), commit=st.booleans())
    def views(self, limit: int, commit: bool) -> None:
        n = min(limit, len(self.queue))
        batch = self.reader.views(limit)
        assert [(t, bytes(v)) for t, v in batch.records] == list(self.queue)[:n]
        if commit:
            batch.commit()
            for _ in range(n):
                self.pop()
        else:
            batch.abort()

    # -- invariants
    @invariant()
    def offsets_and_counters_agree(self) -> None:
        assert self.ring.used == self.used
        assert self.ring.write_offset == self.writer.write_offset == self.written_bytes
        assert self.writer.discarded == self.ring.discarded == self.discarded

    def teardown(self) -> None:
        del self.writer, self.reader
        self.ring.close()


RingMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingModel = RingMachine.TestCase
