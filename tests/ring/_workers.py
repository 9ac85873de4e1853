"""Entry points run in child processes (spawned, so they must be importable)."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from array import array
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue

from kmnode.ring import Reader, Ring, Writer

END = 1
DATA = 0
HEAD = struct.Struct("<IIQ")  # writer id, crc32 of the body, sequence number


def write_numbers(name: str, count: int) -> None:
    """Attach by name and write `count` numbered records (type = index % 7)."""
    ring = Ring.attach(name)
    writer = Writer(ring, timeout=10.0)
    for i in range(count):
        writer.write(i.to_bytes(4, "little") * (1 + i % 50), i % 7)
    ring.close()


def read_numbers(name: str, count: int, out: Connection) -> None:
    """Attach by name, block for `count` records, send back (type, payload) pairs."""
    ring = Ring.attach(name)
    reader = Reader(ring)
    got: list[tuple[int, bytes]] = []
    while len(got) < count:
        rec = reader.read_typed(timeout=10.0)
        if rec is None:
            break
        got.append(rec)
    out.send(got)
    out.close()
    ring.close()


def stress_reader(name: str, results: Queue[object], n_writers: int) -> None:
    """Two threads drain the ring through one Reader; each checks what it receives.

    Per thread and writer, the sequence numbers must rise strictly (the ring hands records to
    readers in ring order under the host-side lock).  Checksums are verified on every record.
    Thread 0 uses batches, thread 1 single reads and zero-copy views.
    """
    ring = Ring.attach(name)
    reader = Reader(ring, lock_timeout=30.0, gil_release_bytes=32)
    done = threading.Event()
    errors: list[str] = []
    seqs: list[list[array[int]]] = [[array("Q") for _ in range(n_writers)] for _ in range(2)]

    def check(tid: int, rtype: int, payload: bytes | memoryview, last: list[int]) -> None:
        if rtype == END:
            done.set()
            return
        wid, crc, seq = HEAD.unpack_from(payload)
        body = payload[HEAD.size :]
        if zlib.crc32(body) != crc or len(body) != seq % 41:
            errors.append(f"thread {tid}: bad checksum/length writer {wid} seq {seq}")
            return
        if seq <= last[wid]:
            errors.append(f"thread {tid}: writer {wid} order broken: {seq} after {last[wid]}")
        last[wid] = seq
        seqs[tid][wid].append(seq)

    give_up = time.monotonic() + 240.0  # bounded even if the END record never comes

    def run(tid: int) -> None:
        last = [-1] * n_writers
        step = 0
        try:
            while not done.is_set():
                if time.monotonic() > give_up:
                    errors.append(f"thread {tid}: no END record within 240 s")
                    done.set()
                    break
                step += 1
                if tid == 0:
                    for rtype, payload in reader.read_batch_typed(512, timeout=0.05):
                        check(tid, rtype, payload, last)
                elif step % 2:
                    rec = reader.read_typed(timeout=0.05)
                    if rec is not None:
                        check(tid, rec[0], rec[1], last)
                else:
                    with reader.views(64, timeout=0.05) as views:
                        for rtype, view in views:
                            check(tid, rtype, view, last)
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(f"thread {tid}: {exc!r}")
            done.set()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((errors, [[a.tobytes() for a in per] for per in seqs]))
    ring.close()
