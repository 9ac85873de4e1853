"""A msgpack "bomb" from an attested peer: what decoding one 8 MiB Raft frame costs a node.

One byte of msgpack is a whole empty list, so an 8 MiB frame of nested empty arrays becomes
hundreds of MiB of Python lists, and seconds of a stalled event loop, if only the lengths of
single arrays and strings are bounded (what ``consensus.codec`` did before issue 13). The
codec now also bounds arrays and their elements per message (``DecodeLimits.max_items``) and
stops at the first one past it. Both decoders run in the same process, on the same frames:

* ``unbounded item count``: ``msgpack.unpackb`` with the per-type length limits the codec used
  before (strings 1 KiB, arrays 4,096 or the entry limit, bins the frame size);
* ``consensus.codec``: ``decode_message`` with the default ``DecodeLimits``.

Each figure is the median of ``--rounds`` decodes, wall time and peak RSS growth (the peak is
per process, so each decoder's rounds run in a child process of their own).

    python -m bench.bomb             # 3 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import platform
import resource
import statistics
import struct
import time
from collections.abc import Callable

import msgpack

from bench.machine import cpu_model
from consensus.codec import CodecError, decode_message

FRAME = 8 * 1024 * 1024
#: The longest array the codec took before issue 13 (entries of an append).
OLD_MAX_ARRAY = 100_000
_HEADER = b"\x9d" + b"\x01\x01\xa1b\xa1a\x01\x00\x00"  # an append: type, term, from, to, ...
_TRAILER = b"\x00\xc2\x00\xc0\xc4\x00"


def flat_bomb() -> bytes:
    """One append whose entries are each an array of 80 empty arrays (every array short)."""
    entry = b"\xdc\x00\x50" + b"\x90" * 80
    count = min((FRAME - 200) // len(entry), 100_000)
    return _HEADER + b"\xdd" + struct.pack(">I", count) + entry * count + _TRAILER


def nested_bomb() -> bytes:
    """2,000 entries of 4,000 empty arrays: within every per-array limit, about 8 MiB."""
    inner = b"\xdc" + struct.pack(">H", 4000) + b"\x90" * 4000
    return _HEADER + b"\xdc" + struct.pack(">H", 2000) + inner * 2000 + _TRAILER


def unbounded_items(data: bytes) -> None:
    """The codec's decoding before issue 13: per-type lengths only."""
    msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=1024,
        max_bin_len=FRAME,
        max_array_len=OLD_MAX_ARRAY,
        max_map_len=0,
        max_ext_len=0,
    )


def bounded(data: bytes) -> None:
    decode_message(data)


DECODERS: dict[str, Callable[[bytes], None]] = {
    "unbounded item count": unbounded_items,
    "consensus.codec": bounded,
}
FRAMES: dict[str, Callable[[], bytes]] = {"flat": flat_bomb, "nested": nested_bomb}


def _rounds(decoder: str, frame: str, rounds: int, out: multiprocessing.Queue[object]) -> None:
    data = FRAMES[frame]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        # Refused is what the codec should do; the time to refuse is the figure.
        with contextlib.suppress(CodecError, ValueError, msgpack.exceptions.ExtraData):
            DECODERS[decoder](data)
        times.append(time.perf_counter() - start)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out.put((statistics.median(times), grown, len(data)))


def measure(decoder: str, frame: str, rounds: int) -> tuple[float, float, int]:
    """(median seconds, peak RSS growth in MiB, frame bytes) in a fresh child process."""
    queue: multiprocessing.Queue[object] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_rounds, args=(decoder, frame, rounds, queue))
    child.start()
    result = queue.get(timeout=600)
    child.join(60)
    assert isinstance(result, tuple) and len(result) == 3
    seconds, mib, size = result
    return float(seconds), float(mib), int(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {platform.python_version()}, rounds: {args.rounds}")
    for frame in FRAMES:
        figures = {d: measure(d, frame, args.rounds) for d in DECODERS}
        (old_s, old_mib, size), (new_s, new_mib, _) = figures.values()
        print(f"{frame} bomb, {size / 2**20:.1f} MiB frame:")
        for name, (seconds, mib, _) in figures.items():
            print(f"  {name:22} {seconds * 1000:10.3f} ms  {mib:7.1f} MiB peak growth")
        memory = old_mib / max(new_mib, 0.1)
        print(f"  ratio (before / now): {old_s / new_s:,.0f}x time, {memory:,.0f}x memory")


if __name__ == "__main__":
    main()
