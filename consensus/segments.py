"""Record framing of the log's segment files, and the scan that tells a torn tail from damage.

Record layout (little endian)::

    length u32 | payload_crc u32 | header_crc u32 | payload (length bytes)

``payload_crc`` is ``zlib.crc32(payload)`` and ``header_crc`` is ``zlib.crc32`` of the first
eight header bytes. The header has its own checksum because a flipped bit in a length field
would otherwise make a record in the middle of the log look like it runs past the end of the
file, and be "recovered" by truncating everything after it. With the header checked, any damage
is detected where it is, and the recovery rule below can be applied honestly.

Recovery rule: a damaged record (short header, short payload, bad header or payload checksum)
is a *torn tail* if and only if no intact record follows it anywhere in the log (the rest of its
segment and every later segment). A torn tail is what a crash during an append leaves, so it is
cut off. A damaged record followed by an intact one cannot be explained by a crash during an
append; that is corruption of data the node may already have acknowledged, and start-up refuses
with the file and offset (``CorruptLogError``). Consequently a flipped byte in the very last
record is indistinguishable from a torn write and is truncated; Raft tolerates that loss because
a quorum holds every acknowledged entry, and the leader re-sends it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

HEADER = struct.Struct("<II")
U32 = struct.Struct("<I")
HEADER_SIZE = HEADER.size + U32.size

#: Upper bound for one record: anything larger in a header is damage, not data.
MAX_RECORD_BYTES = 256 * 1024 * 1024


class StorageError(Exception):
    """Base of the durable log's errors."""


class CorruptLogError(StorageError):
    """A record that a crash cannot explain is damaged; the node must not start on this log."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"corrupt log record in {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class TamperedLogError(CorruptLogError):
    """A record of an authenticated log fails its tag or breaks the chain: changed, foreign,
    removed, inserted or reordered (``consensus.recordauth``). The node must not start."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(path, offset, reason)
        self.args = (f"log record in {path} at offset {offset} fails authentication: {reason}",)


def encode_record(payload: bytes) -> bytes:
    """Frame ``payload`` as one checksummed record."""
    head = HEADER.pack(len(payload), zlib.crc32(payload))
    return head + U32.pack(zlib.crc32(head)) + payload


@dataclass(frozen=True, slots=True)
class Damage:
    """Where and why the first unreadable record of a segment starts."""

    offset: int
    reason: str


def check_record(buf: bytes, off: int, max_record: int = MAX_RECORD_BYTES) -> str | None:
    """Return why the record at ``off`` is unreadable, or None if it is intact."""
    end = len(buf)
    if end - off < HEADER_SIZE:
        return f"incomplete header ({end - off} of {HEADER_SIZE} bytes)"
    length, crc = HEADER.unpack_from(buf, off)
    (hcrc,) = U32.unpack_from(buf, off + HEADER.size)
    if zlib.crc32(buf[off : off + HEADER.size]) != hcrc:
        return "header checksum mismatch"
    if length == 0 or length > max_record:
        return f"implausible record length {length}"
    start = off + HEADER_SIZE
    if start + length > end:
        return f"incomplete payload ({end - start} of {length} bytes)"
    if zlib.crc32(buf[start : start + length]) != crc:
        return "payload checksum mismatch"
    return None


def read_records(buf: bytes) -> tuple[list[tuple[int, bytes]], Damage | None]:
    """Split a segment's bytes into ``(offset, payload)`` records up to the first damage."""
    records: list[tuple[int, bytes]] = []
    off = 0
    end = len(buf)
    unpack_header = HEADER.unpack_from
    unpack_u32 = U32.unpack_from
    crc32 = zlib.crc32
    while off < end:
        # Fast path inline; the slow path re-checks to produce the reason.
        if end - off >= HEADER_SIZE:
            length, crc = unpack_header(buf, off)
            start = off + HEADER_SIZE
            if (
                0 < length <= MAX_RECORD_BYTES
                and start + length <= end
                and crc32(buf[off : off + HEADER.size]) == unpack_u32(buf, off + HEADER.size)[0]
            ):
                payload = buf[start : start + length]
                if crc32(payload) == crc:
                    records.append((off, payload))
                    off = start + length
                    continue
        reason = check_record(buf, off)
        return records, Damage(off, reason or "unreadable record")
    return records, None


def find_intact_record(buf: bytes, start: int) -> int | None:
    """Offset of the first intact record at or after ``start``, trying every byte offset.

    Only called after damage was found, to decide between a torn tail and corruption; the
    plausibility checks reject almost every offset before any checksum is computed.
    """
    end = len(buf)
    if not buf[start:].strip(b"\0"):
        return None  # a zero-filled tail (extended but never written): nothing intact in it
    unpack_header = HEADER.unpack_from
    for off in range(start, end - HEADER_SIZE + 1):
        length, _ = unpack_header(buf, off)
        if length == 0 or off + HEADER_SIZE + length > end:
            continue
        if check_record(buf, off) is None:
            return off
    return None
