"""A million records: 4 writer threads here, 2 reader threads in another process.

Every record carries its writer's id, a sequence number and a CRC of its body.  Two writers
wait when the ring is full and must lose nothing; two discard, and every discard must show up
in the counters, exactly.  Readers check checksums and that each writer's records arrive in
order; the union of what they received must be exactly what was written, without duplicates.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import zlib
from array import array

from kmnode.ring import OnFull, Ring, Writer
from tests.ring import _workers
from tests.ring.conftest import unique_name

TOTAL = int(os.environ.get("KMRING_STRESS_RECORDS", "1000000"))
N_WRITERS = 4
BATCH = 64


def make_record(wid: int, seq: int) -> bytes:
    body = ((seq * 2654435761) & 0xFFFFFFFF).to_bytes(4, "little") * 11
    body = body[: seq % 41]
    return _workers.HEAD.pack(wid, zlib.crc32(body), seq) + body


def test_four_writer_threads_two_reader_threads_in_another_process() -> None:
    per = TOTAL // N_WRITERS
    name = unique_name("stress")
    ring = Ring.create(name, 1 << 16, max_record=1024)
    # records are 16..56 bytes: a threshold of 32 sends them down both copy paths
    writer = Writer(ring, timeout=60.0, lock_timeout=30.0, gil_release_bytes=32)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_workers.stress_reader, args=(name, results, N_WRITERS), daemon=True)
    child.start()

    dropped_single: set[int] = set()
    dropped_batch = [0]
    failures: list[BaseException] = []

    def wait_single(wid: int) -> None:
        for seq in range(per):
            assert writer.write(make_record(wid, seq), on_full=OnFull.WAIT)

    def wait_batch(wid: int) -> None:
        for start in range(0, per, BATCH):
            recs = [make_record(wid, s) for s in range(start, min(per, start + BATCH))]
            assert writer.write_batch(recs, on_full=OnFull.WAIT) == len(recs)

    def discard_single(wid: int) -> None:
        for seq in range(per):
            if not writer.write(make_record(wid, seq), on_full=OnFull.DISCARD):
                dropped_single.add(seq)

    def discard_batch(wid: int) -> None:
        for start in range(0, per, BATCH):
            recs = [make_record(wid, s) for s in range(start, min(per, start + BATCH))]
            dropped_batch[0] += len(recs) - writer.write_batch(recs, on_full=OnFull.DISCARD)

    def guarded(fn: object, wid: int) -> None:
        try:
            assert callable(fn)
            fn(wid)
        except BaseException as exc:
            failures.append(exc)

    plans = [wait_single, wait_batch, discard_single, discard_batch]
    threads = [threading.Thread(target=guarded, args=(fn, wid)) for wid, fn in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    writer.write(b"", _workers.END, on_full=OnFull.WAIT)

    errors, per_thread = results.get(timeout=300)
    child.join(60)
    assert child.exitcode == 0
    assert errors == []

    received: list[list[int]] = [[] for _ in range(N_WRITERS)]
    for thread_seqs in per_thread:
        for wid, raw in enumerate(thread_seqs):
            received[wid].extend(array("Q", raw))
    for wid in range(N_WRITERS):
        assert len(set(received[wid])) == len(received[wid]), f"writer {wid}: duplicates"
        assert set(received[wid]) <= set(range(per)), f"writer {wid}: records never written"
    assert sorted(received[0]) == list(range(per))
    assert sorted(received[1]) == list(range(per))
    assert set(received[2]) == set(range(per)) - dropped_single
    assert len(received[3]) == per - dropped_batch[0]

    discards = len(dropped_single) + dropped_batch[0]
    assert writer.discarded == ring.discarded == discards
    assert sum(len(r) for r in received) + discards == per * N_WRITERS
    idle = [
        t for t, thread_seqs in enumerate(per_thread) if not thread_seqs[0] or not thread_seqs[1]
    ]
    assert idle == [], "a reader thread received nothing"
    ring.close()
