"""Behaviour of the ring on its own: framing, wrapping, modes, batches, views, wake-ups."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from kmnode.ring import (
    FRAME_SIZE,
    OnFull,
    Reader,
    RecordTooLarge,
    Ring,
    RingClosed,
    RingFull,
    Writer,
    record_size,
)
from tests.ring import _workers
from tests.ring.conftest import unique_name


def test_record_size_is_frame_plus_padded_payload() -> None:
    assert FRAME_SIZE == 8
    assert record_size(0) == 8
    assert record_size(1) == 16
    assert record_size(8) == 16
    assert record_size(9) == 24


def test_roundtrip_types_and_bytes_like(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    assert w.write(b"hello", 7)
    assert w.write(bytearray(b"ba"), 1)
    assert w.write(memoryview(b"xmvx")[1:3], 2)
    assert w.write(b"")
    assert r.read_typed() == (7, b"hello")
    assert r.read_typed() == (1, b"ba")
    assert r.read() == b"mv"
    assert r.read() == b""
    assert r.read() is None
    assert small_ring.used == 0


def test_records_wrap_around_the_end(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    sent = 0
    for i in range(300):
        payload = bytes([i % 251]) * (i * 13 % 997)
        assert w.write(payload, i)
        assert r.read_typed() == (i, payload)
        sent += record_size(len(payload))
    assert small_ring.write_offset == small_ring.read_offset == sent
    assert sent > 10 * small_ring.capacity


def test_max_record_is_enforced_with_a_clear_error(small_ring: Ring) -> None:
    w = Writer(small_ring)
    assert w.write(b"x" * 1000)
    with pytest.raises(RecordTooLarge, match="1001 bytes exceeds the maximum 1000"):
        w.write(b"x" * 1001)
    with pytest.raises(RecordTooLarge, match="record 1 "):
        w.write_batch([b"a", b"x" * 5000])
    assert small_ring.write_offset == record_size(1000)  # the batch wrote nothing


def test_full_ring_modes(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    rec = b"z" * 1000  # 1008 bytes framed: four fit in 4096
    for _ in range(4):
        assert w.write(rec, on_full=OnFull.FAIL)
    with pytest.raises(RingFull):
        w.write(rec, on_full=OnFull.FAIL)
    assert w.write(rec, on_full=OnFull.DISCARD) is False
    assert w.write(rec, on_full=OnFull.DISCARD) is False
    assert w.discarded == small_ring.discarded == 2
    t0 = time.monotonic()
    with pytest.raises(RingFull):
        w.write(rec, on_full=OnFull.WAIT, timeout=0.1)
    assert time.monotonic() - t0 >= 0.09
    # a small record still fits in the 64 bytes left
    assert w.write(b"s" * 50, on_full=OnFull.FAIL)
    assert len(r.read_batch()) == 5


def test_writer_waits_until_a_reader_frees_space(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    for _ in range(4):
        w.write(b"a" * 1000)
    freed = threading.Event()

    def drain_later() -> None:
        time.sleep(0.05)
        assert r.read() == b"a" * 1000
        freed.set()

    t = threading.Thread(target=drain_later)
    t.start()
    assert w.write(b"b" * 1000, on_full=OnFull.WAIT, timeout=10.0)
    t.join(5)
    assert freed.is_set()
    assert [x[:1] for x in r.read_batch()] == [b"a", b"a", b"a", b"b"]


def test_batch_write_modes(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    recs = [bytes([i]) * 600 for i in range(10)]  # 608 framed: six fit
    with pytest.raises(RingFull) as err:
        w.write_batch(recs, 3, on_full=OnFull.FAIL)
    assert err.value.written == 6
    assert r.read_batch_typed(100) == [(3, x) for x in recs[:6]]
    with pytest.raises(RingFull) as err:
        w.write_batch(recs, on_full=OnFull.WAIT, timeout=0.05)
    assert err.value.written == 6
    r.read_batch(100)
    assert w.write_batch([*recs, b"tiny"], on_full=OnFull.DISCARD) == 7
    assert w.discarded == 4
    assert r.read_batch(100) == [*recs[:6], b"tiny"]
    assert w.write_batch([]) == 0


def test_read_batch_limits_and_order(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    assert w.write_batch([str(i).encode() for i in range(100)], 5) == 100
    assert r.read_batch(30) == [str(i).encode() for i in range(30)]
    assert r.read_batch_typed(1) == [(5, b"30")]
    assert r.read_batch() == [str(i).encode() for i in range(31, 100)]
    assert r.read_batch() == []
    with pytest.raises(ValueError):
        r.read_batch(0)


def test_zero_copy_views_commit_and_abort(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    # place records across the wrap point
    w.write_batch([b"p" * 992] * 3)  # 3000 bytes framed
    r.read_batch()
    for i in range(3):
        w.write(bytes([65 + i]) * 500, i)
    batch = r.views(2)
    with batch as views:
        assert [(t, bytes(v)) for t, v in views] == [(0, b"A" * 500), (1, b"B" * 500)]
        assert views[0][1].readonly
        kept = views[0][1]
    with pytest.raises(ValueError):
        bytes(kept)  # released on commit: the bytes are the writer's again
    with pytest.raises(RuntimeError), r.views() as views:
        assert bytes(views[0][1]) == b"C" * 500
        raise RuntimeError("abort")
    assert r.read_typed() == (2, b"C" * 500)  # the aborted batch was not consumed
    with r.views(timeout=0.01) as views:
        assert views == []


def test_views_keep_the_mapping_alive(ring_name: str) -> None:
    ring = Ring.create(ring_name, 4096)
    w, r = Writer(ring), Reader(ring)
    w.write(b"abc")
    batch = r.views()
    with pytest.raises(BufferError):
        ring.close()
    batch.commit()
    ring.close()
    with pytest.raises(RingClosed):
        w.write(b"x")
    with pytest.raises(RingClosed):
        r.read()


def test_blocking_read_wakes_on_data_and_times_out(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    t0 = time.monotonic()
    assert r.read(timeout=0.05) is None
    assert time.monotonic() - t0 >= 0.045

    def write_later() -> None:
        time.sleep(0.05)
        w.write(b"late")

    t = threading.Thread(target=write_later)
    t.start()
    assert r.read(timeout=10.0) == b"late"
    t.join(5)
    t = threading.Thread(target=write_later)
    t.start()
    assert r.read_batch(timeout=10.0) == [b"late"]
    t.join(5)


def test_interrupt_releases_a_blocked_reader(small_ring: Ring) -> None:
    r = Reader(small_ring)
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(r.read(timeout=None)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    r.interrupt()
    t.join(5)
    assert not t.is_alive()
    assert result == [None]


def test_wait_readable(small_ring: Ring) -> None:
    w, r = Writer(small_ring), Reader(small_ring)
    assert r.wait_readable(0.01) is False
    w.write(b"x")
    assert r.wait_readable(0.01) is True


def test_create_validation(ring_name: str) -> None:
    with pytest.raises(ValueError):
        Ring.create(ring_name, 5000)
    with pytest.raises(ValueError):
        Ring.create(ring_name, 1024)
    with pytest.raises(ValueError):
        Ring.create(ring_name, 4096, max_record=4096)
    with pytest.raises(ValueError):
        Ring.create("bad/name", 4096)
    with pytest.raises(TypeError):
        Ring()
    ring = Ring.create(ring_name, 8192)
    assert ring.max_record == 2048
    with pytest.raises(FileExistsError):
        Ring.create(ring_name, 8192)
    ring.close()
    with pytest.raises(FileNotFoundError):
        Ring.attach(ring_name)


def test_writer_rejects_bad_arguments(small_ring: Ring) -> None:
    with pytest.raises(ValueError):
        Writer(small_ring, on_full=9)
    with pytest.raises(ValueError):
        Writer(small_ring, timeout=-1.0)
    w = Writer(small_ring)
    with pytest.raises(ValueError):
        w.write(b"x", on_full=7)
    with pytest.raises(ValueError):
        w.write(b"x", timeout=-1.0)
    with pytest.raises(TypeError):
        w.write("text")


def test_attach_sees_the_same_ring_and_creator_unlinks(ring_name: str) -> None:
    ring = Ring.create(ring_name, 16384, max_record=100)
    other = Ring.attach(ring_name)
    assert (other.capacity, other.max_record) == (16384, 100)
    Writer(ring).write(b"shared")
    assert Reader(other).read() == b"shared"
    other.close()
    ring.close()
    with pytest.raises(FileNotFoundError):
        Ring.attach(ring_name)


def test_many_writer_and_reader_threads_in_one_process(ring_name: str) -> None:
    ring = Ring.create(ring_name, 8192)
    w, r = Writer(ring, timeout=30.0), Reader(ring)
    per, n_writers = 3000, 4
    got: list[list[tuple[int, int]]] = [[], []]
    stop = threading.Event()

    def write(wid: int) -> None:
        for seq in range(per):
            w.write(seq.to_bytes(4, "little"), wid)

    give_up = time.monotonic() + 60.0

    def read(tid: int) -> None:
        while (not stop.is_set() or ring.used) and time.monotonic() < give_up:
            for t, p in r.read_batch_typed(16, timeout=0.01):
                got[tid].append((t, int.from_bytes(p, "little")))

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    writers = [threading.Thread(target=write, args=(i,)) for i in range(n_writers)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    for wid in range(n_writers):
        for tid in range(2):
            seqs = [s for t, s in got[tid] if t == wid]
            assert seqs == sorted(seqs)
        assert sorted(s for tid in range(2) for t, s in got[tid] if t == wid) == list(range(per))
    ring.close()


def test_cross_process_writer_and_reader() -> None:
    ctx = mp.get_context("spawn")
    name = unique_name("xproc")
    ring = Ring.create(name, 8192)
    reader = Reader(ring)
    child = ctx.Process(target=_workers.write_numbers, args=(name, 2000), daemon=True)
    child.start()
    got = []
    while len(got) < 2000:
        rec = reader.read_typed(timeout=30.0)
        assert rec is not None
        got.append(rec)
    child.join(30)
    assert child.exitcode == 0
    assert got == [(i % 7, i.to_bytes(4, "little") * (1 + i % 50)) for i in range(2000)]

    # and the other way round: this process writes, a child blocks reading
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_workers.read_numbers, args=(name, 500, child_end), daemon=True)
    child.start()
    writer = Writer(ring, timeout=30.0)
    time.sleep(0.1)  # let the child block in its read first: it must be woken, not poll
    for i in range(500):
        writer.write(i.to_bytes(4, "little") * (1 + i % 50), i % 7)
    assert parent_end.poll(60)
    assert parent_end.recv() == [
        (i % 7, i.to_bytes(4, "little") * (1 + i % 50)) for i in range(500)
    ]
    child.join(30)
    assert child.exitcode == 0
    ring.close()


@pytest.mark.parametrize("threshold", [0, 1 << 30])
def test_gil_release_threshold_does_not_change_results(ring_name: str, threshold: int) -> None:
    ring = Ring.create(ring_name, 1 << 19)
    w = Writer(ring, gil_release_bytes=threshold)
    r = Reader(ring, gil_release_bytes=threshold)
    recs = [bytes([i]) * (i * 37 % 3000) for i in range(200)]
    for rec in recs[:100]:
        w.write(rec)
    assert [r.read() for _ in range(100)] == recs[:100]
    w.write_batch(recs[100:])
    assert r.read_batch(1000) == recs[100:]
    ring.close()


def _close_inherited(ring: Ring) -> None:
    ring.close()


def test_a_forked_child_closing_the_ring_does_not_unlink_it(ring_name: str) -> None:
    ring = Ring.create(ring_name, 4096)
    child = mp.get_context("fork").Process(target=_close_inherited, args=(ring,), daemon=True)
    child.start()
    child.join(30)
    assert child.exitcode == 0
    other = Ring.attach(ring_name)  # the name survived the child's close()
    other.close()
    ring.close()
    with pytest.raises(FileNotFoundError):
        Ring.attach(ring_name)
