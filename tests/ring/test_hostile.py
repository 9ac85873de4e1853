"""A hostile host: it owns the shared memory too and may write anything into it, or sit on a lock.

The TEE side (Writer) must answer every impossible state with RingCorrupted before it writes,
never write outside the data region, and give up on a held lock after its timeout with the
record reported unwritten.  The host side (Reader) must not crash on garbage either.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kmnode.ring import (
    LAYOUT,
    OnFull,
    Reader,
    Ring,
    RingCorrupted,
    RingError,
    RingFull,
    RingLockTimeout,
    Writer,
    record_size,
)
from tests.ring.conftest import HostileHost, unique_name

CAP = 4096
TEE_OWNED = ("write_offset", "discarded")


def assert_nothing_written(before: bytes, after: bytes) -> None:
    """Apart from lock words (taken and released), not a byte of the object may change."""
    lock_words = {LAYOUT["writer_lock"] + i for i in range(4)}
    changed = [i for i in range(len(before)) if before[i] != after[i] and i not in lock_words]
    assert changed == []


def fill_some(ring: Ring) -> tuple[Writer, Reader]:
    """Twelve records of 312 bytes written (352 bytes free), the first read by the host."""
    w, r = Writer(ring, lock_timeout=0.05, timeout=0.05), Reader(ring, lock_timeout=0.05)
    for i in range(12):
        w.write(bytes([i]) * 300, i)
    assert r.read() == b"\0" * 300
    return w, r


# Big enough that the writer cannot rely on the read offset it saw last and must load it.
BIG = b"x" * 1000


@pytest.mark.parametrize(
    ("label", "value"),
    [
        ("read ahead of write", lambda w, r: w + 8),
        ("read more than a capacity behind", lambda w, r: w - CAP - 8),
        ("read moved backwards", lambda w, r: r - 8),
        ("read unaligned", lambda w, r: r + 3),
        ("read huge", lambda w, r: 2**64 - 8),
    ],
)
def test_writer_rejects_impossible_read_offsets(
    small_ring: Ring, host: HostileHost, label: str, value: object
) -> None:
    w, _ = fill_some(small_ring)
    w.write(b"z" * 500)  # too big for the cached view: the writer loads the current read offset
    wo, ro = host.get64("write_offset"), host.get64("read_offset")
    assert callable(value)
    host.set64("read_offset", value(wo, ro))
    before = host.snapshot()
    for attempt in (lambda: w.write(BIG), lambda: w.write_batch([BIG, b"y"])):
        with pytest.raises(RingCorrupted, match="read offset"):
            attempt()
    assert_nothing_written(before, host.snapshot())
    assert w.write_offset == wo
    # once the host restores a sane value the TEE carries on
    host.set64("read_offset", ro)
    assert w.write(b"ok")
    assert w.write_offset == wo + 16


def test_a_batch_stopped_by_a_corrupted_read_offset_keeps_its_written_prefix(
    small_ring: Ring, host: HostileHost
) -> None:
    w, r = fill_some(small_ring)
    host.set64("read_offset", 2**63)
    with pytest.raises(RingCorrupted, match="read offset"):
        w.write_batch([b"a", b"b", BIG, BIG])
    host.set64("read_offset", record_size(300))
    assert r.read_batch()[-2:] == [b"a", b"b"]


@pytest.mark.parametrize("delta", [8, -8, 2**40, CAP])
def test_writer_rejects_a_write_offset_changed_behind_its_back(
    small_ring: Ring, host: HostileHost, delta: int
) -> None:
    w, _ = fill_some(small_ring)
    wo = host.get64("write_offset")
    host.set64("write_offset", wo + delta)
    before = host.snapshot()
    with pytest.raises(RingCorrupted, match="write offset"):
        w.write(b"x")
    assert_nothing_written(before, host.snapshot())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("capacity", 1 << 40, "capacity"),
        ("capacity", 2 * CAP, "capacity"),
        ("capacity", 0, "capacity"),
        ("max_record", 1 << 30, "maximum record size"),
    ],
)
def test_writer_rejects_changed_capacity_and_limits(
    small_ring: Ring, host: HostileHost, field: str, value: int, match: str
) -> None:
    w, r = fill_some(small_ring)
    host.set64(field, value)
    before = host.snapshot()
    with pytest.raises(RingCorrupted, match=match):
        w.write(b"x" * 10)
    with pytest.raises(RingCorrupted, match=match):
        w.write_batch([b"x"] * 10)
    assert_nothing_written(before, host.snapshot())
    # the TEE still refuses oversized records by its private limit
    with pytest.raises(RingError):
        w.write(b"x" * 2000)
    if field == "capacity":
        with pytest.raises(RingCorrupted, match="capacity"):
            r.read()


def test_writer_lock_held_by_the_host_times_out_and_loses_nothing(
    small_ring: Ring, host: HostileHost
) -> None:
    w, r = fill_some(small_ring)
    before_w = w.write_offset
    for value in (1, 2, 0xDEADBEEF):
        host.set32("writer_lock", value)
        t0 = time.monotonic()
        with pytest.raises(RingLockTimeout, match="record not written") as err:
            w.write(b"must not vanish")
        assert 0.04 <= time.monotonic() - t0 < 5.0
        assert err.value.written == 0
        with pytest.raises(RingLockTimeout) as err:
            w.write_batch([b"a", b"b"])
        assert err.value.written == 0
        assert w.write_offset == before_w
        assert isinstance(err.value, TimeoutError)
    # the host lets go: the same record goes in, exactly once
    host.set32("writer_lock", 0)
    assert w.write(b"must not vanish")
    assert r.read_batch()[-1] == b"must not vanish"


def test_waiting_for_space_never_outlives_its_timeout(small_ring: Ring, host: HostileHost) -> None:
    """A host that never reads (and lies in the waiter counts) cannot hang a WAIT write."""
    w = Writer(small_ring, lock_timeout=0.05)
    for _ in range(10_000):  # fill the ring: bounded, it holds far fewer records
        if not w.write(b"x" * 500, on_full=OnFull.DISCARD):
            break
    else:
        raise AssertionError("the ring never filled")
    host.set32("writer_waiters", 0xFFFFFFFF)
    host.set32("reader_waiters", 7)
    t0 = time.monotonic()
    with pytest.raises(RingFull):
        w.write(b"x" * 500, on_full=OnFull.WAIT, timeout=0.1)
    assert time.monotonic() - t0 < 5.0


def test_tampered_discard_counter_does_not_fool_the_tee(
    small_ring: Ring, host: HostileHost
) -> None:
    w = Writer(small_ring)
    for _ in range(10_000):  # fill the ring: bounded, it holds far fewer records
        if not w.write(b"x" * 900, on_full=OnFull.DISCARD):
            break
    else:
        raise AssertionError("the ring never filled")
    host.set64("discarded", 12345)
    assert w.write(b"x" * 900, on_full=OnFull.DISCARD) is False
    assert w.discarded == 2
    assert small_ring.discarded == 12346


@pytest.mark.parametrize(
    ("length", "label"),
    [(0xFFFFFFFF, "huge"), (1001, "over max_record"), (600, "past the write offset")],
)
def test_reader_rejects_garbage_frame_lengths(
    small_ring: Ring, host: HostileHost, length: int, label: str
) -> None:
    w, r = fill_some(small_ring)
    assert len(r.read_batch(10)) == 10  # one record left, 312 bytes before the write offset
    ro = host.get64("read_offset")
    host.set_frame(ro, CAP, length)
    with pytest.raises(RingCorrupted, match="frame"):
        r.read()
    with pytest.raises(RingCorrupted, match="frame"):
        r.read_batch()
    with pytest.raises(RingCorrupted, match="frame"):
        r.views()
    assert host.get64("read_offset") == ro  # nothing consumed
    # a bad frame after a good one: the good prefix is delivered, the bad one raises next
    host.set_frame(ro, CAP, 300, 11)
    w.write(b"\x0c" * 300, 12)
    host.set_frame(ro + record_size(300), CAP, length)
    assert r.read_batch() == [b"\x0b" * 300]
    with pytest.raises(RingCorrupted):
        r.read_batch()


@pytest.mark.parametrize("bad", ["behind read", "unaligned", "beyond capacity"])
def test_reader_rejects_impossible_write_offsets(
    small_ring: Ring, host: HostileHost, bad: str
) -> None:
    _, r = fill_some(small_ring)
    assert len(r.read_batch()) == 11  # drained: the reader must load the write offset again
    ro = host.get64("read_offset")
    bad_offsets = {"behind read": ro - 8, "unaligned": ro + 5, "beyond capacity": ro + CAP + 8}
    host.set64("write_offset", bad_offsets[bad])
    with pytest.raises(RingCorrupted, match="write offset"):
        r.read()
    with pytest.raises(RingCorrupted):
        r.read_batch()
    with pytest.raises(RingCorrupted):
        r.views()


def test_reader_lock_held_times_out(small_ring: Ring, host: HostileHost) -> None:
    _, r = fill_some(small_ring)
    host.set32("reader_lock", 1)
    with pytest.raises(RingLockTimeout):
        r.read()
    host.set32("reader_lock", 0)
    assert r.read() == b"\x01" * 300


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("magic", 0, "magic"),
        ("capacity", 8192, "capacity"),
        ("max_record", 0, "maximum record"),
        ("max_record", CAP, "maximum record"),
    ],
)
def test_attach_rejects_a_corrupted_header(
    ring_name: str, field: str, value: int, match: str
) -> None:
    ring = Ring.create(ring_name, CAP)
    host = HostileHost(ring_name)
    host.set64(field, value)
    with pytest.raises(RingCorrupted, match=match):
        Ring.attach(ring_name)
    host.close()
    ring.close()


def test_writer_attach_rejects_impossible_offsets(small_ring: Ring, host: HostileHost) -> None:
    host.set64("write_offset", 64)
    host.set64("read_offset", 128)
    with pytest.raises(RingCorrupted, match="at attach"):
        Writer(small_ring)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    write_off=st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 3 * CAP),
    read_off=st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 3 * CAP),
    frames=st.lists(
        st.tuples(st.integers(0, CAP // 8 - 1).map(lambda k: 8 * k), st.integers(0, 2**32 - 1)),
        max_size=8,
    ),
    garbage=st.binary(max_size=64),
    payload=st.binary(max_size=1000),
)
def test_fuzzed_header_never_crashes_or_writes_out_of_bounds(
    write_off: int | None,
    read_off: int | None,
    frames: list[tuple[int, int]],
    garbage: bytes,
    payload: bytes,
) -> None:
    """Random offsets, frame lengths and bytes: every call succeeds or raises a RingError.

    A successful TEE write must land at its private write offset and nowhere else.
    """
    name = unique_name("fuzz")
    ring = Ring.create(name, CAP, max_record=1000)
    host = HostileHost(name)
    try:
        w, r = Writer(ring, lock_timeout=0.01, timeout=0.0), Reader(ring, lock_timeout=0.01)
        w.write(b"seed" * 10)
        if write_off is not None:
            host.set64("write_offset", write_off)
        if read_off is not None:
            host.set64("read_offset", read_off)
        for pos, length in frames:
            host.set_frame(pos, CAP, length)
        host.mm[LAYOUT["data"] : LAYOUT["data"] + len(garbage)] = garbage
        for op in (
            lambda: r.read(),
            lambda: r.read_batch(),
            lambda: r.views().abort(),
            lambda: w.write(payload, on_full=OnFull.DISCARD),
        ):
            before = host.snapshot()
            w_before = w.write_offset
            with contextlib.suppress(RingError):
                op()
            after = host.snapshot()
            if w.write_offset != w_before:  # the writer wrote: only its record's bytes changed
                event("the TEE wrote despite the tampering")
                size = record_size(len(payload))
                allowed = {LAYOUT["data"] + (w_before + i) % CAP for i in range(size)}
                allowed |= {LAYOUT["write_offset"] + i for i in range(8)}
                allowed |= {LAYOUT["writer_lock"] + i for i in range(4)}
                allowed |= {LAYOUT["reader_lock"] + i for i in range(4)}
                changed = {i for i in range(len(before)) if before[i] != after[i]}
                assert changed <= allowed
    finally:
        host.close()
        ring.close()
