"""One canonical byte encoding for every attestation structure.

Signatures and MACs are computed over bytes, so each structure must have exactly one encoding:
a 4-byte tag naming the structure, a field count, then each field as a 4-byte big-endian length
and its bytes. Decoding is strict (exact tag, exact field count, no trailing bytes, bounded
sizes), which is what makes "flip any bit and it is rejected" hold: a flipped bit either breaks
the framing here or changes signed content that a signature check then refuses.
"""

from __future__ import annotations

import struct

from attest.errors import MalformedEvidence

_HEADER = struct.Struct(">4sB")
_LEN = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")

#: No attestation structure comes anywhere near this; it bounds work done on hostile input.
MAX_ENCODED = 64 * 1024


def pack(tag: bytes, *fields: bytes) -> bytes:
    """Encode ``fields`` under ``tag`` (exactly 4 bytes)."""
    parts = [_HEADER.pack(tag, len(fields))]
    for value in fields:
        parts.append(_LEN.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def unpack(data: bytes, tag: bytes, count: int, what: str) -> list[bytes]:
    """Decode bytes made by :func:`pack`, or raise :class:`MalformedEvidence` naming ``what``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ENCODED:
        raise MalformedEvidence(f"{what}: {len(data)} bytes exceeds the {MAX_ENCODED} limit")
    if len(data) < _HEADER.size:
        raise MalformedEvidence(f"{what}: truncated header")
    got_tag, got_count = _HEADER.unpack_from(data, 0)
    if got_tag != tag:
        raise MalformedEvidence(f"{what}: wrong type tag {got_tag!r}, expected {tag!r}")
    if got_count != count:
        raise MalformedEvidence(f"{what}: {got_count} fields, expected {count}")
    fields: list[bytes] = []
    offset = _HEADER.size
    for index in range(count):
        if offset + _LEN.size > len(data):
            raise MalformedEvidence(f"{what}: truncated at field {index}")
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        end = offset + length
        if end > len(data):
            raise MalformedEvidence(f"{what}: field {index} runs past the end")
        fields.append(data[offset:end])
        offset = end
    if offset != len(data):
        raise MalformedEvidence(f"{what}: {len(data) - offset} trailing bytes")
    return fields


def fixed(value: bytes, size: int, what: str) -> bytes:
    """Return ``value`` if it has exactly ``size`` bytes (keys, hashes, nonces)."""
    if len(value) != size:
        raise MalformedEvidence(f"{what}: {len(value)} bytes, expected {size}")
    return value


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u16(value: bytes, what: str) -> int:
    return int(_U16.unpack(fixed(value, 2, what))[0])


def read_u64(value: bytes, what: str) -> int:
    return int(_U64.unpack(fixed(value, 8, what))[0])


def text(value: bytes, what: str, max_len: int = 128) -> str:
    """Decode a short UTF-8 identifier (platform id, node name)."""
    if not value or len(value) > max_len:
        raise MalformedEvidence(f"{what}: length {len(value)} outside 1..{max_len}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEvidence(f"{what}: not UTF-8") from exc
