"""The service enclave's line to the host's contract-state store: frames, messages, a client.

The host keeps contract state (sealed records, opaque to it) in its store; the enclave reaches
it over a Unix socketpair the host made, one blocking request and reply at a time, like an
OCALL. This module is the enclave's half and the codec both halves share; the host's half is
``kmnode.host.contract_store``. Nothing here trusts the other end: records are checked by
``VerifiedBacking`` above, and the bytes of the wire by the strict decoder below.

A frame is ``length (u32, big-endian) | body``; a body is ``op (u8) | request id (u64) |
payload``, with every field of a fixed width or length-prefixed, no JSON (records are binary
and up to 64 KiB). Decoding is strict: every limit below is checked before anything is
allocated for it, unknown ops, bad flags, invalid UTF-8 and trailing bytes are refused, and all
of it surfaces as ``StoreWireError`` (whose messages never carry record bytes).

Why request ids: a reply that comes after its request timed out must not be taken as the
answer to the next one, so the client drops replies to ids older than the one it waits for.

Why ``put_many`` may take several frames: the enclave's cache can flush a batch larger than a
frame (its byte bound is configurable), and a batch must land whole or not at all (the
enclave's version table moves only when the host took the batch). So a large batch goes as
numbered parts the host stages, and only the final part commits them, in one transaction.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kmnode.contracts.sealed_state import HIDDEN_BYTES
from kmnode.contracts.storage import MAX_VALUE_BYTES

#: Longest contract name on the wire, in UTF-8 bytes.
MAX_CONTRACT_BYTES = 64
#: Longest record: a sealed value of at most ``MAX_VALUE_BYTES`` plus its header and tag.
MAX_RECORD_BYTES = MAX_VALUE_BYTES + 64
#: Most entries in one frame (a put part, a page of records, a list of checkpoints).
MAX_BATCH = 4096
#: Longest frame body.
MAX_FRAME_BYTES = 8 << 20
#: Longest refusal message (the host's words, shortened to this).
MAX_ERROR_BYTES = 1024
#: Seconds the client waits for each reply before it gives up (``StoreUnavailable``).
DEFAULT_TIMEOUT = 10.0
#: Records the client asks for per page of ``records()``.
DEFAULT_PAGE = 512

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BQ")
_U64_MAX = 2**64 - 1


class StoreWireError(Exception):
    """A frame or message that breaks the protocol, or a host that refused a request."""


class StoreUnavailable(StoreWireError):
    """The host did not answer in time, or the connection to it is gone."""


class StoreRefused(StoreWireError):
    """The host answered with a refusal (a bad request, or its store failed)."""


# ---- messages ------------------------------------------------------------------------------

#: One put entry: a hidden key and its record (``None``: delete the key).
PutEntry = tuple[bytes, bytes | None]
#: One stored record: contract, hidden key, record.
RecordEntry = tuple[str, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Get:
    contract: str
    hidden: bytes


@dataclass(frozen=True, slots=True)
class PutMany:
    """Part ``part`` (from 0) of a batch; the host commits the staged parts at ``final``."""

    contract: str
    entries: tuple[PutEntry, ...]
    part: int
    final: bool


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int


@dataclass(frozen=True, slots=True)
class Restore:
    seq: int


@dataclass(frozen=True, slots=True)
class ListRecords:
    """Up to ``limit`` records after ``after`` (contract, hidden), in that order."""

    contract: str | None
    after: tuple[str, bytes] | None
    limit: int


@dataclass(frozen=True, slots=True)
class ListCheckpoints:
    pass


@dataclass(frozen=True, slots=True)
class Found:
    record: bytes | None


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Restored:
    found: bool


@dataclass(frozen=True, slots=True)
class RecordsPage:
    entries: tuple[RecordEntry, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class CheckpointList:
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    message: str


Request = Get | PutMany | Checkpoint | Restore | ListRecords | ListCheckpoints
Reply = Found | Done | Restored | RecordsPage | CheckpointList | Refused

_REQUEST_OPS: dict[type[Request], int] = {
    Get: 1, PutMany: 2, Checkpoint: 3, Restore: 4, ListRecords: 5, ListCheckpoints: 6,
}  # fmt: skip
_REPLY_OPS: dict[type[Reply], int] = {
    Found: 0x81, Done: 0x82, Restored: 0x84, RecordsPage: 0x85, CheckpointList: 0x86,
    Refused: 0xFF,
}  # fmt: skip


# ---- limits, shared with the host's store --------------------------------------------------


def check_contract(contract: str) -> bytes:
    """The name's UTF-8 bytes, if it is a contract name the wire carries."""
    try:
        raw = contract.encode()
    except UnicodeEncodeError:
        raise StoreWireError("a contract name is not valid UTF-8") from None
    if not 0 < len(raw) <= MAX_CONTRACT_BYTES:
        raise StoreWireError(f"a contract name is 1 to {MAX_CONTRACT_BYTES} bytes, not {len(raw)}")
    return raw


def check_hidden(hidden: bytes) -> None:
    if len(hidden) != HIDDEN_BYTES:
        raise StoreWireError(f"a hidden key is {HIDDEN_BYTES} bytes, not {len(hidden)}")


def check_record(record: bytes) -> None:
    if len(record) > MAX_RECORD_BYTES:
        raise StoreWireError(f"a record is at most {MAX_RECORD_BYTES} bytes, not {len(record)}")


def check_seq(seq: int) -> None:
    if not 0 <= seq <= _U64_MAX:
        raise StoreWireError("a checkpoint sequence number is 0 to 2**64 - 1")


def _check_count(count: int, what: str) -> None:
    if count > MAX_BATCH:
        raise StoreWireError(f"{count} {what} in one frame; at most {MAX_BATCH}")


# ---- encoding ------------------------------------------------------------------------------


class _Writer:
    def __init__(self, op: int, request_id: int) -> None:
        if not 0 <= request_id <= _U64_MAX:
            raise StoreWireError("a request id is 0 to 2**64 - 1")
        self.out = bytearray(_HEADER.pack(op, request_id))

    def u8(self, value: int) -> None:
        self.out.append(value)

    def u32(self, value: int) -> None:
        self.out += value.to_bytes(4, "big")

    def u64(self, value: int) -> None:
        self.out += value.to_bytes(8, "big")

    def flag(self, value: bool) -> None:
        self.out.append(1 if value else 0)

    def name(self, contract: str) -> None:
        raw = check_contract(contract)
        self.out.append(len(raw))
        self.out += raw

    def hidden(self, hidden: bytes) -> None:
        check_hidden(hidden)
        self.out += hidden

    def record(self, record: bytes) -> None:
        check_record(record)
        self.u32(len(record))
        self.out += record

    def optional_record(self, record: bytes | None) -> None:
        self.flag(record is not None)
        if record is not None:
            self.record(record)

    def body(self) -> bytes:
        if len(self.out) > MAX_FRAME_BYTES:
            raise StoreWireError(f"a frame of {len(self.out)} bytes; at most {MAX_FRAME_BYTES}")
        return bytes(self.out)


def encode_request(request_id: int, request: Request) -> bytes:
    """A request's frame body (``StoreWireError`` if it breaks a limit)."""
    out = _Writer(_REQUEST_OPS[type(request)], request_id)
    match request:
        case Get(contract, hidden):
            out.name(contract)
            out.hidden(hidden)
        case PutMany(contract, entries, part, final):
            out.name(contract)
            _check_count(len(entries), "put entries")
            if not 0 <= part < 2**32:
                raise StoreWireError("a put part number is 0 to 2**32 - 1")
            out.u32(part)
            out.flag(final)
            out.u32(len(entries))
            for hidden, record in entries:
                out.hidden(hidden)
                out.optional_record(record)
        case Checkpoint(seq) | Restore(seq):
            check_seq(seq)
            out.u64(seq)
        case ListRecords(contract, after, limit):
            if not 0 < limit <= MAX_BATCH:
                raise StoreWireError(f"a page is 1 to {MAX_BATCH} records, not {limit}")
            out.flag(contract is not None)
            if contract is not None:
                out.name(contract)
            out.flag(after is not None)
            if after is not None:
                out.name(after[0])
                out.hidden(after[1])
            out.u32(limit)
        case ListCheckpoints():
            pass
    return out.body()


def encode_reply(request_id: int, reply: Reply) -> bytes:
    """A reply's frame body (``StoreWireError`` if it breaks a limit)."""
    out = _Writer(_REPLY_OPS[type(reply)], request_id)
    match reply:
        case Found(record):
            out.optional_record(record)
        case Done():
            pass
        case Restored(found):
            out.flag(found)
        case RecordsPage(entries, more):
            _check_count(len(entries), "records")
            out.u32(len(entries))
            for contract, hidden, record in entries:
                out.name(contract)
                out.hidden(hidden)
                out.record(record)
            out.flag(more)
        case CheckpointList(seqs):
            _check_count(len(seqs), "checkpoints")
            out.u32(len(seqs))
            for seq in seqs:
                check_seq(seq)
                out.u64(seq)
        case Refused(message):
            raw = message.encode(errors="replace")
            if len(raw) > MAX_ERROR_BYTES:
                raise StoreWireError(f"a refusal is at most {MAX_ERROR_BYTES} bytes")
            out.u32(len(raw))
            out.out += raw
    return out.body()


def refusal(text: str) -> Refused:
    """A refusal whose message fits the wire (long texts are cut, never refused)."""
    raw = text.encode(errors="replace")[:MAX_ERROR_BYTES]
    return Refused(raw.decode(errors="ignore"))


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix."""
    if len(body) > MAX_FRAME_BYTES:
        raise StoreWireError(f"a frame of {len(body)} bytes; at most {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


# ---- decoding ------------------------------------------------------------------------------


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.body = memoryview(body)
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if end > len(self.body):
            raise StoreWireError(f"the frame ends inside {what}")
        raw = bytes(self.body[self.pos : end])
        self.pos = end
        return raw

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def flag(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise StoreWireError(f"{what} is {value}, not 0 or 1")
        return value == 1

    def count(self, what: str) -> int:
        count = self.u32(f"a count of {what}")
        _check_count(count, what)
        return count

    def name(self) -> str:
        size = self.u8("a contract name's length")
        if not 0 < size <= MAX_CONTRACT_BYTES:
            raise StoreWireError(f"a contract name is 1 to {MAX_CONTRACT_BYTES} bytes, not {size}")
        try:
            return self.take(size, "a contract name").decode()
        except UnicodeDecodeError:
            raise StoreWireError("a contract name is not valid UTF-8") from None

    def hidden(self) -> bytes:
        return self.take(HIDDEN_BYTES, "a hidden key")

    def record(self) -> bytes:
        size = self.u32("a record's length")
        if size > MAX_RECORD_BYTES:
            raise StoreWireError(f"a record is at most {MAX_RECORD_BYTES} bytes, not {size}")
        return self.take(size, "a record")

    def optional_record(self) -> bytes | None:
        return self.record() if self.flag("a record's presence flag") else None

    def end(self) -> None:
        extra = len(self.body) - self.pos
        if extra:
            raise StoreWireError(f"{extra} bytes after the end of the message")


def _header(body: bytes) -> tuple[_Reader, int, int]:
    if len(body) < _HEADER.size:
        raise StoreWireError(f"a frame of {len(body)} bytes is shorter than its header")
    op, request_id = _HEADER.unpack_from(body)
    reader = _Reader(body)
    reader.pos = _HEADER.size
    return reader, op, request_id


def request_id_of(body: bytes) -> int:
    """The request id a body names (0 if it is too short to name one): a refusal of a request
    that does not decode still goes to the request it answers."""
    return _HEADER.unpack_from(body)[1] if len(body) >= _HEADER.size else 0


def decode_request(body: bytes) -> tuple[int, Request]:
    """(request id, request) of a frame body; ``StoreWireError`` if it is not exactly one."""
    reader, op, request_id = _header(body)
    request: Request
    if op == 1:
        request = Get(reader.name(), reader.hidden())
    elif op == 2:
        contract = reader.name()
        part = reader.u32("a put part number")
        final = reader.flag("a put's final flag")
        entries = tuple(
            (reader.hidden(), reader.optional_record()) for _ in range(reader.count("put entries"))
        )
        request = PutMany(contract, entries, part, final)
    elif op in (3, 4):
        seq = reader.u64("a checkpoint sequence number")
        request = Checkpoint(seq) if op == 3 else Restore(seq)
    elif op == 5:
        only = reader.name() if reader.flag("a contract filter flag") else None
        after = (reader.name(), reader.hidden()) if reader.flag("a page cursor flag") else None
        limit = reader.u32("a page size")
        if not 0 < limit <= MAX_BATCH:
            raise StoreWireError(f"a page is 1 to {MAX_BATCH} records, not {limit}")
        request = ListRecords(only, after, limit)
    elif op == 6:
        request = ListCheckpoints()
    else:
        raise StoreWireError(f"unknown request op {op}")
    reader.end()
    return request_id, request


def decode_reply(body: bytes) -> tuple[int, Reply]:
    """(request id, reply) of a frame body; ``StoreWireError`` if it is not exactly one."""
    reader, op, request_id = _header(body)
    reply: Reply
    if op == 0x81:
        reply = Found(reader.optional_record())
    elif op == 0x82:
        reply = Done()
    elif op == 0x84:
        reply = Restored(reader.flag("a restore's found flag"))
    elif op == 0x85:
        entries = tuple(
            (reader.name(), reader.hidden(), reader.record())
            for _ in range(reader.count("records"))
        )
        reply = RecordsPage(entries, reader.flag("a page's more flag"))
    elif op == 0x86:
        reply = CheckpointList(
            tuple(reader.u64("a checkpoint") for _ in range(reader.count("checkpoints")))
        )
    elif op == 0xFF:
        size = reader.u32("a refusal's length")
        if size > MAX_ERROR_BYTES:
            raise StoreWireError(f"a refusal is at most {MAX_ERROR_BYTES} bytes, not {size}")
        try:
            reply = Refused(reader.take(size, "a refusal").decode())
        except UnicodeDecodeError:
            raise StoreWireError("a refusal is not valid UTF-8") from None
    else:
        raise StoreWireError(f"unknown reply op {op}")
    reader.end()
    return request_id, reply


class FrameReader:
    """Frame bodies out of a byte stream that arrives in pieces. A length over the limit is
    refused at once (before a byte of that frame is buffered): after it, the stream has no
    frame boundaries left to trust, so the connection must go."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> bytes | None:
        """The next whole frame's body, or ``None`` until more bytes arrive."""
        if len(self._buffer) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack_from(self._buffer)
        if size > MAX_FRAME_BYTES:
            raise StoreWireError(f"a frame of {size} bytes announced; at most {MAX_FRAME_BYTES}")
        end = _LENGTH.size + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        return body


# ---- the client ----------------------------------------------------------------------------

_R = TypeVar("_R")
#: Bytes a put part's entries may take (the rest of a frame is its header and contract name).
_PART_BYTES = MAX_FRAME_BYTES - 256


def _put_parts(entries: Sequence[PutEntry]) -> Iterator[tuple[PutEntry, ...]]:
    """A batch cut into parts that each fit one frame, in order."""
    part: list[PutEntry] = []
    size = 0
    for hidden, record in entries:
        entry_size = HIDDEN_BYTES + 1 + (0 if record is None else 4 + len(record))
        if part and (len(part) == MAX_BATCH or size + entry_size > _PART_BYTES):
            yield tuple(part)
            part, size = [], 0
        part.append((hidden, record))
        size += entry_size
    yield tuple(part)


class StoreClient:
    """A ``HostStore`` (and more) over a connected socket to the host's ``ContractStore``.

    It owns the socket (``close`` closes it). Every call waits at most ``timeout`` seconds for
    its reply (``StoreUnavailable`` then), so the enclave never hangs on a host that stalls. A
    reply that times out may still arrive later; it is recognized by its id and dropped. After
    a failure the stream cannot recover from (a frame only partly sent, a frame length over the
    limit, the host gone) every later call fails at once, saying why.
    """

    def __init__(
        self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT, page: int = DEFAULT_PAGE
    ) -> None:
        if timeout <= 0:
            raise ValueError("a store timeout is positive")
        if not 0 < page <= MAX_BATCH:
            raise ValueError(f"a records page is 1 to {MAX_BATCH} records")
        self._sock = sock
        #: Seconds each call waits for its reply (the caller may change it between calls).
        self.timeout = timeout
        self._page = page
        self._ids = itertools.count(1)
        self._frames = FrameReader()
        self._lock = threading.Lock()
        self._broken: str | None = None

    # -- the HostStore protocol --

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        return self._call(Get(contract, hidden), Found).record

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None:
        """Store a batch (``None`` deletes); durable on the host when this returns, and all of
        it or none of it (see the module docstring)."""
        entries = list(records.items())
        check_contract(contract)
        for hidden, record in entries:  # all of it checked before any part is sent
            check_hidden(hidden)
            if record is not None:
                check_record(record)
        if not entries:
            return
        parts = list(_put_parts(entries))
        for number, part in enumerate(parts):
            self._call(PutMany(contract, part, number, number == len(parts) - 1), Done)

    # -- checkpoints and listing --

    def checkpoint(self, seq: int) -> None:
        """The host keeps a copy of all current records as checkpoint ``seq``."""
        self._call(Checkpoint(seq), Done)

    def restore(self, seq: int) -> bool:
        """The host's records become checkpoint ``seq``'s copy; False if it has none."""
        return self._call(Restore(seq), Restored).found

    def checkpoints(self) -> list[int]:
        seqs = list(self._call(ListCheckpoints(), CheckpointList).seqs)
        if seqs != sorted(set(seqs)):
            raise StoreWireError("the host listed checkpoints out of order")
        return seqs

    def records(self, contract: str | None = None) -> Iterator[RecordEntry]:
        """Every current record (of ``contract``, or all), in (contract, hidden) order, a page
        per request. A page out of order, off the filter or empty with more to come is refused,
        so a lying host cannot keep this loop going."""
        if contract is not None:
            check_contract(contract)
        after: tuple[str, bytes] | None = None
        while True:
            page = self._call(ListRecords(contract, after, self._page), RecordsPage)
            if len(page.entries) > self._page or (page.more and not page.entries):
                raise StoreWireError("the host sent a records page of the wrong size")
            for name, hidden, record in page.entries:
                if contract is not None and name != contract:
                    raise StoreWireError("the host sent a record of another contract")
                if after is not None and (name.encode(), hidden) <= (after[0].encode(), after[1]):
                    raise StoreWireError("the host sent records out of order")
                after = (name, hidden)
                yield name, hidden, record
            if not page.more:
                return

    def close(self) -> None:
        with self._lock:
            self._broken = self._broken or "the client was closed"
            self._sock.close()

    def __repr__(self) -> str:
        state = "ok" if self._broken is None else "broken"
        return f"StoreClient(timeout={self.timeout}, {state})"

    # -- one round trip --

    def _call(self, request: Request, expect: type[_R]) -> _R:
        with self._lock:
            if self._broken is not None:
                raise StoreUnavailable(f"the store connection is unusable: {self._broken}")
            request_id = next(self._ids)
            data = frame(encode_request(request_id, request))
            deadline = time.monotonic() + self.timeout
            self._send(data, deadline)
            while True:
                reply_id, reply = decode_reply(self._receive(deadline))
                if isinstance(reply, Refused) and reply_id in (0, request_id):
                    raise StoreRefused(f"the host refused the request: {reply.message}")
                if reply_id < request_id:
                    continue  # the late reply to a request that timed out
                if reply_id != request_id:
                    raise StoreWireError(f"a reply to request {reply_id}, not {request_id}")
                if not isinstance(reply, expect):
                    raise StoreWireError(
                        f"a {type(reply).__name__} reply to a {type(request).__name__}"
                    )
                return reply

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            self._sock.sendall(data)
        except TimeoutError:
            self._broken = "a request was only partly sent"
            raise StoreUnavailable(
                f"the host did not take a request within {self.timeout} s"
            ) from None
        except OSError as exc:
            self._broken = f"sending failed ({exc.strerror or type(exc).__name__})"
            raise StoreUnavailable(f"the store connection failed: {self._broken}") from None

    def _receive(self, deadline: float) -> bytes:
        while True:
            try:
                body = self._frames.next()
            except StoreWireError:
                self._broken = "the host sent a frame over the limit"
                raise
            if body is not None:
                return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(f"the host did not answer within {self.timeout} s")
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                raise StoreUnavailable(f"the host did not answer within {self.timeout} s") from None
            except OSError as exc:
                self._broken = f"receiving failed ({exc.strerror or type(exc).__name__})"
                raise StoreUnavailable(f"the store connection failed: {self._broken}") from None
            if not chunk:
                self._broken = "the host closed the connection"
                raise StoreUnavailable(self._broken)
            self._frames.feed(chunk)


__all__ = [
    "DEFAULT_PAGE",
    "DEFAULT_TIMEOUT",
    "MAX_BATCH",
    "MAX_CONTRACT_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_RECORD_BYTES",
    "Checkpoint",
    "CheckpointList",
    "Done",
    "Found",
    "FrameReader",
    "Get",
    "ListCheckpoints",
    "ListRecords",
    "PutEntry",
    "PutMany",
    "RecordEntry",
    "RecordsPage",
    "Refused",
    "Reply",
    "Request",
    "Restore",
    "Restored",
    "StoreClient",
    "StoreRefused",
    "StoreUnavailable",
    "StoreWireError",
    "check_contract",
    "check_hidden",
    "check_record",
    "check_seq",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "frame",
    "refusal",
    "request_id_of",
]
