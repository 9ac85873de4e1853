"""Benchmark: the kmnode ring against the usual ways Python processes move bytes.

Every transport runs in the same invocation, on the same payloads, in the same two shapes:
one writer process to one reader process, and four writer threads (one process) to one
reader process.  Each figure is the median of several runs (the machine is small and noisy);
ratios are computed from figures measured in this run only.  Also measured here: the
machine's memcpy bandwidth (the ceiling for large records) and the cost of the OCALL variant.

    python bench/ring.py                 # full run (a few minutes on 2 cores)
    python bench/ring.py --quick         # smoke run: fewer records, one repetition
    python bench/ring.py --markdown bench/results/ring.md
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import platform
import select
import statistics
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from kmnode.ring import OcallWriter, Reader, Ring, Writer, _ring
from kmnode.ring.ocall import DEFAULT_SWITCH_CYCLES, cycles_per_second

SIZES = (64, 1024, 65536)
RING_CAPACITY = 1 << 23
BATCH_BYTES = 1 << 18  # records per batch call: up to this many bytes, at most 256 records
FRAME = struct.Struct("<I")
CTX = mp.get_context("fork")
TIMEOUT = 60.0


def batch_len(size: int) -> int:
    return max(1, min(256, BATCH_BYTES // size))


def now() -> int:
    return time.monotonic_ns()


# ----------------------------------------------------------------------------- transports
#
# A transport is: a setup run in the parent before forking (returns a picklable-by-fork
# context), a writer body run by each writer thread, and a reader body.  Each writer body
# sends `n` copies of `payload`; the reader body receives `total` messages and returns.


@dataclass
class Transport:
    name: str
    api: str  # "one-record" or "batch"
    setup: Callable[[int], dict[str, Any]]
    writer_init: Callable[[dict[str, Any], int], Any]  # per writer thread: (ctx, thread index)
    write: Callable[[Any, bytes, int], None]
    reader: Callable[[dict[str, Any], int, int], None]
    teardown: Callable[[dict[str, Any]], None]


def _nothing(ctx: dict[str, Any]) -> None:
    return None


# -- kmnode ring


def ring_setup(size: int) -> dict[str, Any]:
    name = f"kmring-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ring = Ring.create(name, RING_CAPACITY, max_record=max(SIZES))
    return {"name": name, "ring": ring, "lock": threading.Lock(), "writer": None}


def ring_writer_init(ctx: dict[str, Any], index: int) -> Writer:
    # One Writer per TEE process, shared by its threads (it owns the private write offset).
    with ctx["lock"]:
        if ctx["writer"] is None:
            ctx["writer"] = Writer(Ring.attach(ctx["name"]), timeout=TIMEOUT)
        writer: Writer = ctx["writer"]
        return writer


def ring_write(writer: Writer, payload: bytes, n: int) -> None:
    write = writer.write
    for _ in range(n):
        write(payload)


def ring_write_batch(writer: Writer, payload: bytes, n: int) -> None:
    b = batch_len(len(payload))
    batch = [payload] * b
    full, rest = divmod(n, b)
    write_batch = writer.write_batch
    for _ in range(full):
        write_batch(batch)
    if rest:
        write_batch(batch[:rest])


def ring_read(ctx: dict[str, Any], total: int, size: int) -> None:
    reader = Reader(Ring.attach(ctx["name"]))
    read = reader.read
    for _ in range(total):
        if read(TIMEOUT) is None:
            raise TimeoutError("ring reader starved")


def ring_read_batch(ctx: dict[str, Any], total: int, size: int) -> None:
    reader = Reader(Ring.attach(ctx["name"]))
    limit = batch_len(size)
    got = 0
    read_batch = reader.read_batch
    while got < total:
        records = read_batch(limit, TIMEOUT)
        if not records:
            raise TimeoutError("ring reader starved")
        got += len(records)


def ring_teardown(ctx: dict[str, Any]) -> None:
    ctx["ring"].close()


# -- faster-fifo (bytes passed through as they are: no pickling, its most favourable setting)


def _same(x: Any) -> Any:
    return x


def ff_setup(size: int) -> dict[str, Any]:
    import faster_fifo

    q = faster_fifo.Queue(max_size_bytes=RING_CAPACITY, loads=_same, dumps=_same)
    return {"q": q}


def ff_writer_init(ctx: dict[str, Any], index: int) -> Any:
    return ctx["q"]


def ff_write(q: Any, payload: bytes, n: int) -> None:
    put = q.put
    for _ in range(n):
        put(payload, True, TIMEOUT)


def ff_write_batch(q: Any, payload: bytes, n: int) -> None:
    b = batch_len(len(payload))
    batch = [payload] * b
    full, rest = divmod(n, b)
    for _ in range(full):
        q.put_many(batch, True, TIMEOUT)
    if rest:
        q.put_many(batch[:rest], True, TIMEOUT)


def ff_read(ctx: dict[str, Any], total: int, size: int) -> None:
    get = ctx["q"].get
    for _ in range(total):
        get(True, TIMEOUT)


def ff_read_batch(ctx: dict[str, Any], total: int, size: int) -> None:
    q = ctx["q"]
    got = 0
    while got < total:
        got += len(q.get_many(True, TIMEOUT, batch_len(size)))


# -- multiprocessing.Queue


def mpq_setup(size: int) -> dict[str, Any]:
    # unbounded: a maxsize adds a semaphore operation to every put, and slows it down
    return {"q": CTX.Queue()}


def mpq_write(q: Any, payload: bytes, n: int) -> None:
    put = q.put
    for _ in range(n):
        put(payload)


def mpq_read(ctx: dict[str, Any], total: int, size: int) -> None:
    get = ctx["q"].get
    for _ in range(total):
        get(timeout=TIMEOUT)


def mpq_teardown(ctx: dict[str, Any]) -> None:
    ctx["q"].close()
    ctx["q"].join_thread()


# -- multiprocessing.Pipe (a Connection is not thread-safe: writer threads share a lock)


def mpp_setup(size: int) -> dict[str, Any]:
    r, w = CTX.Pipe(duplex=False)
    return {"r": r, "w": w, "lock": threading.Lock()}


def mpp_writer_init(ctx: dict[str, Any], index: int) -> Any:
    return (ctx["w"], ctx["lock"])


def mpp_write(state: Any, payload: bytes, n: int) -> None:
    conn, lock = state
    send = conn.send_bytes
    for _ in range(n):
        with lock:
            send(payload)


def mpp_read(ctx: dict[str, Any], total: int, size: int) -> None:
    recv = ctx["r"].recv_bytes
    for _ in range(total):
        recv()


def mpp_teardown(ctx: dict[str, Any]) -> None:
    ctx["r"].close()
    ctx["w"].close()


# -- os.pipe with length-prefixed frames (pipe enlarged to 1 MiB; a lock only for frames
#    above PIPE_BUF, which the kernel would otherwise interleave)


def pipe_setup(size: int) -> dict[str, Any]:
    r, w = os.pipe()
    for fd in (r, w):
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    atomic = size + FRAME.size <= select.PIPE_BUF
    return {"r": r, "w": w, "lock": None if atomic else threading.Lock()}


def pipe_writer_init(ctx: dict[str, Any], index: int) -> Any:
    return (ctx["w"], ctx["lock"])


def pipe_write(state: Any, payload: bytes, n: int) -> None:
    fd, lock = state
    frame = FRAME.pack(len(payload)) + payload
    write = os.write
    if lock is None:
        for _ in range(n):
            write(fd, frame)
    else:
        for _ in range(n):
            with lock:
                view = memoryview(frame)
                while view:
                    view = view[write(fd, view) :]


def pipe_read(ctx: dict[str, Any], total: int, size: int) -> None:
    fd = ctx["r"]
    buf = b""
    got = 0
    unpack = FRAME.unpack_from
    while got < total:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise EOFError("pipe closed early")
        buf = buf + chunk if buf else chunk
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = unpack(buf, pos)
            if end - pos - 4 < length:
                break
            _message = buf[pos + 4 : pos + 4 + length]
            pos += 4 + length
            got += 1
        buf = buf[pos:]


def pipe_teardown(ctx: dict[str, Any]) -> None:
    os.close(ctx["r"])
    os.close(ctx["w"])


TRANSPORTS = [
    Transport(
        "kmnode ring",
        "one-record",
        ring_setup,
        ring_writer_init,
        ring_write,
        ring_read,
        ring_teardown,
    ),
    Transport(
        "kmnode ring",
        "batch",
        ring_setup,
        ring_writer_init,
        ring_write_batch,
        ring_read_batch,
        ring_teardown,
    ),
    Transport("faster-fifo", "one-record", ff_setup, ff_writer_init, ff_write, ff_read, _nothing),
    Transport(
        "faster-fifo", "batch", ff_setup, ff_writer_init, ff_write_batch, ff_read_batch, _nothing
    ),
    Transport(
        "mp.Queue", "one-record", mpq_setup, ff_writer_init, mpq_write, mpq_read, mpq_teardown
    ),
    Transport(
        "mp.Pipe", "one-record", mpp_setup, mpp_writer_init, mpp_write, mpp_read, mpp_teardown
    ),
    Transport(
        "os.pipe", "one-record", pipe_setup, pipe_writer_init, pipe_write, pipe_read, pipe_teardown
    ),
]


# ----------------------------------------------------------------------------- one run


def _writer_proc(
    t: Transport, ctx: dict[str, Any], payload: bytes, n: int, threads: int, go: Event, out: Any
) -> None:
    states = [t.writer_init(ctx, i) for i in range(threads)]
    per = n // threads
    go.wait()
    t0 = now()
    workers = [threading.Thread(target=t.write, args=(s, payload, per)) for s in states]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send(t0)


def _reader_proc(t: Transport, ctx: dict[str, Any], total: int, size: int, out: Any) -> None:
    t.reader(ctx, total, size)
    out.send(now())


def run_once(t: Transport, size: int, n: int, threads: int) -> float:
    """Messages per second for one run (writer start to reader's last message)."""
    n -= n % threads
    ctx = t.setup(size)
    go = CTX.Event()
    w_out, w_in = CTX.Pipe(duplex=False)
    r_out, r_in = CTX.Pipe(duplex=False)
    reader = CTX.Process(target=_reader_proc, args=(t, ctx, n, size, r_in))
    reader.start()
    writer = CTX.Process(target=_writer_proc, args=(t, ctx, b"\xa5" * size, n, threads, go, w_in))
    writer.start()
    time.sleep(0.05)  # both sides attached and idle before the clock starts
    go.set()
    try:
        if not (w_out.poll(TIMEOUT) and r_out.poll(TIMEOUT)):
            raise TimeoutError(f"{t.name} {t.api} {size} B did not finish")
        t0: int = w_out.recv()
        t1: int = r_out.recv()
    finally:
        for p in (writer, reader):
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        t.teardown(ctx)
    return n / ((t1 - t0) / 1e9)


def count_for(size: int, quick: bool) -> int:
    base = {64: 400_000, 1024: 200_000, 65536: 20_000}[size]
    return base // 8 if quick else base


# ----------------------------------------------------------------------------- memcpy, OCALL


def memcpy_bandwidth(block: int, span: int, seconds: float) -> float:
    """Bytes/s copying `block`-sized chunks through a `span`-sized buffer, one thread."""
    src = bytearray(os.urandom(span))
    dst = bytearray(span)
    ms, md = memoryview(src), memoryview(dst)
    copied = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for off in range(0, span, block):
            md[off : off + block] = ms[off : off + block]
        copied += span
    return copied / (time.perf_counter() - t0)


def ocall_costs(quick: bool) -> list[tuple[str, float]]:
    """ns per 64-byte record: switchless write vs OCALL (no modelled cost) vs OCALL (SGX cost)."""
    name = f"kmring-bench-ocall-{os.getpid()}"
    results: list[tuple[str, float]] = []
    with Ring.create(name, 1 << 20) as ring:
        writer, reader = Writer(ring), Reader(ring)
        per_fill = ring.capacity // 72
        variants: list[tuple[str, Callable[[bytes], bool]]] = [
            ("switchless Writer.write", writer.write),
            ("OCALL, switch_cycles=0", OcallWriter.over(writer, switch_cycles=0).write),
            (f"OCALL, switch_cycles={DEFAULT_SWITCH_CYCLES:,}", OcallWriter.over(writer).write),
        ]
        payload = b"o" * 64
        for label, write in variants:
            samples = []
            for _ in range(1 if quick else 5):
                t0 = time.perf_counter_ns()
                for _ in range(per_fill):
                    write(payload)
                samples.append((time.perf_counter_ns() - t0) / per_fill)
                while reader.read_batch(4096):
                    pass
            results.append((label, statistics.median(samples)))
    return results


# ----------------------------------------------------------------------------- main


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc), {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1/8 of the records, one repetition"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per figure (median); default 5, 1 with --quick",
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), choices=SIZES)
    ap.add_argument("--only", nargs="*", default=None, help="transport names to run (default: all)")
    ap.add_argument(
        "--gil-release-bytes",
        type=int,
        default=None,
        help="copies of at least this many bytes release the GIL (0: always)",
    )
    ap.add_argument(
        "--markdown", default=None, help="also write the results as markdown to this file"
    )
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    if args.gil_release_bytes is not None:
        _ring.GIL_RELEASE_BYTES = args.gil_release_bytes
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    cmd = "python bench/ring.py " + " ".join(argv if argv is not None else sys.argv[1:])
    say(f"Command: `{cmd.strip()}`  ")
    say(f"Machine: {machine()}  ")
    say(
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"each figure is the median of {repeats} run(s)"
    )
    say(f"Load average at start (other jobs share this machine): {os.getloadavg()[0]:.1f}  ")
    say(f"Ring: {RING_CAPACITY >> 20} MiB, GIL released for copies >= {_ring.GIL_RELEASE_BYTES} B")
    say()

    # The best of three, so that a burst of load cannot make the limit look low.
    bw_block = max(memcpy_bandwidth(65536, RING_CAPACITY, 0.3) for _ in range(3))
    bw_stream = max(memcpy_bandwidth(1 << 26, 1 << 27, 0.5) for _ in range(3))
    say(
        f"memcpy bandwidth (one thread, best of 3): {bw_block / 1e6:,.0f} MB/s in 64 KiB blocks "
        f"through an 8 MiB buffer (the ring's size); {bw_stream / 1e6:,.0f} MB/s streaming "
        f"64 MiB copies.  The goal below is judged against the first, the higher one."
    )
    say()

    chosen = [t for t in TRANSPORTS if args.only is None or t.name in args.only]
    table: dict[tuple[str, str, int, int], float] = {}
    for threads, shape in (
        (1, "1 writer process -> 1 reader process"),
        (4, "4 writer threads -> 1 reader process"),
    ):
        say(f"### {shape}")
        say()
        say(
            "| transport | API | "
            + " | ".join(f"{s} B msgs/s | {s} B MB/s" for s in args.sizes)
            + " |"
        )
        say("|---|---|" + "---|---|" * len(args.sizes))
        # Round-robin: every repetition runs every transport once, so that load from other
        # jobs on this shared machine drifts over all transports alike, not over one of them.
        samples: dict[tuple[int, int], list[float]] = {}
        for size in args.sizes:
            n = count_for(size, args.quick)
            for _ in range(repeats):
                for i, t in enumerate(chosen):
                    try:
                        rate = run_once(t, size, n, threads)
                    except Exception as exc:  # a peer failing must not hide the others' figures
                        print(f"  {t.name} {t.api} {size} B failed: {exc!r}", file=sys.stderr)
                        rate = float("nan")
                    samples.setdefault((i, size), []).append(rate)
            print(f"  [{size} B x{threads} done]", file=sys.stderr, flush=True)
        for i, t in enumerate(chosen):
            cells = []
            for size in args.sizes:
                rate = statistics.median(samples[(i, size)])
                table[(t.name, t.api, size, threads)] = rate
                cells.append(f"{fmt_rate(rate)} | {rate * size / 1e6:,.0f}")
            say(f"| {t.name} | {t.api} | " + " | ".join(cells) + " |")
        say()

    say("### Ratios and goals (same run)")
    say()
    for threads, shape in ((1, "1 proc -> 1 proc"), (4, "4 threads -> 1 proc")):
        for size in args.sizes:
            peers = {
                k: v
                for k, v in table.items()
                if k[0] != "kmnode ring" and k[2] == size and k[3] == threads and v == v
            }
            if not peers:
                continue
            best_key = max(peers, key=lambda k: peers[k])
            best = peers[best_key]
            single = table.get(("kmnode ring", "one-record", size, threads), float("nan"))
            batch = table.get(("kmnode ring", "batch", size, threads), float("nan"))
            say(
                f"- {shape}, {size} B: fastest peer {best_key[0]} ({best_key[1]}) "
                f"{fmt_rate(best)}/s; "
                f"ring one-record {single / best:.2f}x, ring batch {batch / best:.2f}x"
            )
    say()
    goals = []
    for size in (64, 1024):
        if size not in args.sizes:
            continue
        for threads in (1, 4):
            rates = [
                v
                for k, v in table.items()
                if k[0] != "kmnode ring" and k[2] == size and k[3] == threads and v == v
            ]
            single = table.get(("kmnode ring", "one-record", size, threads), float("nan"))
            if rates:
                ratio = single / max(rates)
                goals.append(
                    f"- one-record API >= 2x fastest peer, {size} B, {threads} writer thread(s): "
                    f"{ratio:.2f}x -> {'MET' if ratio >= 2 else 'MISSED'}"
                )
    if 64 in args.sizes:
        best_batch = max(table.get(("kmnode ring", "batch", 64, th), 0.0) for th in (1, 4))
        goals.append(
            f"- batch API >= 10M records/s at 64 B: {fmt_rate(best_batch)}/s -> "
            f"{'MET' if best_batch >= 10e6 else 'MISSED'}"
        )
    if 65536 in args.sizes:
        best_big = max(
            table.get(("kmnode ring", api, 65536, th), 0.0)
            for api in ("one-record", "batch")
            for th in (1, 4)
        )
        frac = best_big * 65536 / bw_block
        goals.append(
            f"- >= 50% of memcpy bandwidth at 64 KiB: {best_big * 65536 / 1e6:,.0f} MB/s = "
            f"{frac:.0%} of {bw_block / 1e6:,.0f} MB/s -> {'MET' if frac >= 0.5 else 'MISSED'}"
        )
    for g in goals:
        say(g)
    say()

    say("### OCALL variant (64 B records, one thread, same process; ns per record)")
    say()
    hz = cycles_per_second()
    say(
        f"Cycle counter: {hz / 1e9:.2f} GHz, so {DEFAULT_SWITCH_CYCLES:,} cycles = "
        f"{DEFAULT_SWITCH_CYCLES / hz * 1e6:.2f} us"
    )
    say()
    costs = ocall_costs(args.quick)
    base = costs[0][1]
    for label, ns in costs:
        say(
            f"- {label}: {ns:,.0f} ns/record ({1e9 / ns / 1e6:.2f}M records/s, "
            f"{ns / base:.1f}x switchless)"
        )
    say()

    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("## Ring buffer (`bench/ring.py`)\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
