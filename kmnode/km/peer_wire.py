"""Framing on a peer connection, and the enclave-facing handshake over it.

A peer connection carries frames of ``u32 length | kind byte | payload``. The length is checked
before the payload is read, so a hostile peer cannot make us buffer more than one maximum-size
frame. Kinds:

* ``R`` / ``J``: first frame, the handshake HELLO, for a Raft link or a join request;
* ``H``: the other handshake messages;
* ``C``: an attested-channel frame (ciphertext; only the enclave can open it);
* ``E``: a plaintext refusal reason, sent before closing (never contains secrets).

Until the handshake has proved an attested peer, a connection gets small frames
(``PeerLimits.handshake_frame``, a few KiB: the handshake's messages are about 2 KiB) and
little time, so an unauthenticated connection cannot make a node buffer a large frame, nor
wait long, before the enclave looks at what it sent.

The host only moves these bytes: every handshake step and every channel frame is processed by
the KM enclave, addressed by a session id, so no channel key ever exists on the host side.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from attest.channel import FRAME_OVERHEAD
from attest.errors import AttestationError
from consensus.codec import DECODE_LIMITS, DecodeLimits
from consensus.types import Message
from kmnode.config import LimitsSpec
from kmnode.km.enclave import Purpose
from kmnode.km.vnet import StreamWriter

RAFT = b"R"
JOIN = b"J"
HANDSHAKE = b"H"
CHANNEL = b"C"
ERROR = b"E"
_KINDS = {RAFT, JOIN, HANDSHAKE, CHANNEL, ERROR}
_LEN = struct.Struct(">I")
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
#: Largest frame before the handshake completes (the handshake's own are about 2 KiB).
HANDSHAKE_FRAME = 16 * 1024


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """What one peer connection may make this node hold or wait for (``kmnode.config``'s
    ``LimitsSpec`` sets them for a node; the defaults are the same)."""

    #: Largest frame before the handshake completes.
    handshake_frame: int = HANDSHAKE_FRAME
    #: Bytes a connection may have waiting unread before its handshake completes.
    handshake_buffer: int = 1024 * 1024
    #: Seconds from accepting (or dialling) a connection to a completed handshake.
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Incomplete inbound handshakes at once, from one remote address and altogether.
    handshakes_per_address: int = 8
    handshakes_total: int = 64
    #: Largest frame after the handshake.
    frame: int = DEFAULT_MAX_FRAME
    #: msgpack decoding of a Raft message a peer sent.
    decode: DecodeLimits = field(default=DECODE_LIMITS)

    def __post_init__(self) -> None:
        if not 0 < self.handshake_frame <= self.frame:
            raise ValueError("handshake_frame must be positive and at most frame")
        if min(self.handshake_buffer, self.handshakes_per_address, self.handshakes_total) < 1:
            raise ValueError("handshake limits must be positive")
        if not self.handshake_timeout > 0:
            raise ValueError("handshake_timeout must be positive")


DEFAULT_LIMITS = PeerLimits()


def peer_limits(spec: LimitsSpec) -> PeerLimits:
    """A node's limits (cluster.yaml's ``limits``) as its peer links apply them."""
    return PeerLimits(
        handshake_frame=spec.handshake_frame_bytes,
        handshake_buffer=spec.handshake_buffer_bytes,
        handshake_timeout=spec.handshake_timeout_s,
        handshakes_per_address=spec.handshakes_per_address,
        handshakes_total=spec.handshakes_total,
        frame=spec.frame_bytes,
        decode=DecodeLimits(
            max_bytes=spec.frame_bytes,
            max_bin=spec.msgpack_max_bin_bytes,
            max_str=spec.msgpack_max_str_bytes,
            max_array=spec.msgpack_max_array_len,
            max_items=spec.msgpack_max_items,
        ),
    )


class PeerProtocolError(Exception):
    """The peer broke the framing or the handshake; the connection must be closed."""


class FrameTooLarge(PeerProtocolError):
    """A length prefix beyond what this stage of the connection allows."""


class PeerRefused(Exception):
    """The other side refused us and said why (an ``E`` frame)."""


class EnclaveSessions(Protocol):
    """What the host may ask of the KM enclave for peer links (see kmnode.km.enclave): whom
    to accept is the enclave's own decision, so nothing here passes a directory."""

    def open_initiator(self, peer: str, purpose: Purpose) -> tuple[int, bytes]: ...

    def open_responder(self, purpose: Purpose) -> int: ...

    def handshake_step(self, session: int, message: bytes, now: float) -> bytes | None: ...

    def session_peer(self, session: int) -> tuple[str, str]: ...

    def seal_raft(self, session: int, message: Message) -> bytes: ...

    def open_raft(self, session: int, frame: bytes) -> Message: ...

    def close_session(self, session: int) -> None: ...

    def session_refusal(self, session: int) -> str: ...


#: The first frame's kind says what the connection is for.
PURPOSES = {RAFT: Purpose.RAFT, JOIN: Purpose.JOIN}


def channel_frame_size(plaintext_size: int) -> int:
    """Bytes on the wire of a CHANNEL frame sealing ``plaintext_size`` bytes: known before
    sealing, so a sender can refuse to queue a frame without spending a channel counter."""
    return _LEN.size + 1 + FRAME_OVERHEAD + plaintext_size


def _check_length(length: int, max_frame: int) -> None:
    """Refuse a length prefix before reading what it announces."""
    if length < 1:
        raise PeerProtocolError("frame length 0: a frame has at least its kind byte")
    if length > max_frame + 1:
        raise FrameTooLarge(f"frame length {length} exceeds the limit of {max_frame + 1}")


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return _LEN.pack(len(payload) + 1) + kind + payload


def split_frames(
    buffer: bytearray, max_frame: int = DEFAULT_MAX_FRAME
) -> list[tuple[bytes, bytes]]:
    """Remove every complete frame from the front of ``buffer`` and return them as (kind,
    payload); a partial frame stays for the next read. Lets a reader hand everything that
    arrived together to Raft as one batch."""
    frames: list[tuple[bytes, bytes]] = []
    offset = 0
    while len(buffer) - offset >= _LEN.size:
        (length,) = _LEN.unpack_from(buffer, offset)
        _check_length(length, max_frame)
        end = offset + _LEN.size + length
        if end > len(buffer):
            break
        kind = bytes(buffer[offset + _LEN.size : offset + _LEN.size + 1])
        if kind not in _KINDS:
            raise PeerProtocolError(f"unknown frame kind {kind!r}")
        frames.append((kind, bytes(buffer[offset + _LEN.size + 1 : end])))
        offset = end
    del buffer[:offset]
    return frames


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[bytes, bytes]:
    """Next (kind, payload); raises PeerProtocolError on bad framing, EOF as IncompleteRead."""
    header = await reader.readexactly(_LEN.size)
    (length,) = _LEN.unpack(header)
    _check_length(length, max_frame)
    body = await reader.readexactly(length)
    kind = body[:1]
    if kind not in _KINDS:
        raise PeerProtocolError(f"unknown frame kind {kind!r}")
    return kind, body[1:]


async def expect(reader: asyncio.StreamReader, kind: bytes, max_frame: int) -> bytes:
    got, payload = await read_frame(reader, max_frame)
    if got == ERROR:
        raise PeerRefused(payload.decode("utf-8", "replace")[:500])
    if got != kind:
        raise PeerProtocolError(f"expected a {kind!r} frame, got {got!r}")
    return payload


async def initiate(
    enclave: EnclaveSessions,
    reader: asyncio.StreamReader,
    writer: StreamWriter,
    purpose: bytes,
    peer: str,
    limits: PeerLimits = DEFAULT_LIMITS,
) -> int:
    """Run the initiator side; returns the enclave session id of the attested channel."""
    session, hello = enclave.open_initiator(peer, PURPOSES[purpose])
    try:
        async with asyncio.timeout(limits.handshake_timeout):
            writer.write(encode_frame(purpose, hello))
            answer = await expect(reader, HANDSHAKE, limits.handshake_frame)
            finish = enclave.handshake_step(session, answer, time.time())
            assert finish is not None
            writer.write(encode_frame(HANDSHAKE, finish))
            await writer.drain()
    except BaseException:
        enclave.close_session(session)
        raise
    return session


async def respond(
    enclave: EnclaveSessions,
    reader: asyncio.StreamReader,
    writer: StreamWriter,
    hello: bytes,
    purpose: bytes,
    limits: PeerLimits = DEFAULT_LIMITS,
) -> int:
    """Run the responder side after the first frame (read under ``limits.handshake_frame``);
    refusals are sent as ``E`` then raised. The caller bounds the whole handshake's time."""
    session = enclave.open_responder(PURPOSES[purpose])
    try:
        async with asyncio.timeout(limits.handshake_timeout):
            answer = enclave.handshake_step(session, hello, time.time())
            assert answer is not None
            writer.write(encode_frame(HANDSHAKE, answer))
            finish = await expect(reader, HANDSHAKE, limits.handshake_frame)
            enclave.handshake_step(session, finish, time.time())
    except AttestationError as exc:
        enclave.close_session(session)
        writer.write(encode_frame(ERROR, f"{type(exc).__name__}: {exc}".encode()))
        raise
    except BaseException:
        enclave.close_session(session)
        raise
    return session
