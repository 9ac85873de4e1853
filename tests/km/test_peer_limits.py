"""Every limit of the peer port, one at a time: what exceeds it is refused for that reason,
the connection closes, a counter says so, and nothing else happens (no quote is signed, no
message reaches Raft)."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import msgpack
import pytest

from consensus.codec import (
    DECODE_LIMITS,
    CodecError,
    DecodeLimits,
    MessageTooLarge,
    TooManyItems,
    decode_message,
    encode_message,
)
from consensus.types import Entry, Message, MessageType
from kmnode.config import ConfigError, LimitsSpec, parse_config
from kmnode.km.peer_transport import AttestedTransport
from kmnode.km.peer_wire import (
    JOIN,
    RAFT,
    PeerLimits,
    encode_frame,
    peer_limits,
)
from kmnode.km.vnet import ReadLimitExceeded, VirtualNet
from kmnode.km_messages import MAX_NET_CHUNK, Accepted, CircuitError, Data, Event
from kmnode.km_messages import decode as circuit_decode
from kmnode.km_messages import encode as circuit_encode
from tests.host import eventually
from tests.km.peer_links import Links

pytestmark = pytest.mark.timeout(60)


class QuoteCounter:
    """Counts the handshake steps a transport asks of its enclave: a responder signs a quote
    in its first step, so none means no quote was signed."""

    def __init__(self, transport: AttestedTransport) -> None:
        self.count = 0
        self._enclave = transport.enclave
        transport.enclave = self

    def handshake_step(self, session: int, message: bytes, now: float) -> bytes | None:
        self.count += 1
        result: bytes | None = self._enclave.handshake_step(session, message, now)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._enclave, name)


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the node sent before closing the connection (fails if it stays open)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def one_node(limits: PeerLimits) -> Links:
    links = Links(["a", "b"], limits=limits)
    await links.start()
    await eventually(lambda: links.linked("b", "a") and links.linked("a", "b"), "a and b linked")
    return links


async def test_an_oversize_first_frame_is_refused_before_any_work() -> None:
    links = await one_node(PeerLimits())
    try:
        a = links.transports["a"]
        quotes = QuoteCounter(a)
        refused = a.stats.refused
        reader, writer = await connect(a.port)
        # An 8 MiB HELLO announced; only the header and a little of it are sent.
        writer.write(struct.pack(">I", 8 * 1024 * 1024) + RAFT + b"\0" * 1000)
        assert await closed_by_peer(reader) == b""
        writer.close()
        # Just over the handshake frame limit is refused the same way.
        reader, writer = await connect(a.port)
        writer.write(encode_frame(RAFT, b"\0" * (16 * 1024 + 1)))
        assert await closed_by_peer(reader) == b""
        writer.close()
        assert quotes.count == 0
        assert a.stats.refused_oversize == 2 and a.stats.refused == refused + 2
    finally:
        await links.stop()


async def test_a_handshake_that_never_finishes_times_out() -> None:
    links = await one_node(PeerLimits(handshake_timeout=0.3))
    try:
        a = links.transports["a"]
        reader, writer = await connect(a.port)
        writer.write(b"\0\0")  # half a length prefix, then nothing
        started = time.monotonic()
        assert await closed_by_peer(reader) == b""
        assert time.monotonic() - started < 4.0  # the 0.3 s deadline, not the 5 s default
        writer.close()
        assert a.stats.handshake_timeouts == 1
    finally:
        await links.stop()


async def test_incomplete_handshakes_are_limited_per_address_and_in_all() -> None:
    limits = PeerLimits(handshakes_per_address=2, handshakes_total=3, handshake_timeout=30.0)
    links = await one_node(limits)
    opened: list[asyncio.StreamWriter] = []
    try:
        a = links.transports["a"]
        held = []
        for source in ("127.0.0.2", "127.0.0.2"):
            reader, writer = await connect(a.port, source)
            held.append(reader)
            opened.append(writer)
        await eventually(lambda: a._handshakes_open == 2, "two handshakes open")
        # A third from the same address is closed at once, before anything is read.
        reader, writer = await connect(a.port, "127.0.0.2")
        opened.append(writer)
        assert await closed_by_peer(reader) == b""
        assert a.stats.refused_busy == 1
        # Another address still gets one (three in all), then nobody does.
        reader, writer = await connect(a.port, "127.0.0.3")
        opened.append(writer)
        await eventually(lambda: a._handshakes_open == 3, "three handshakes open")
        reader, writer = await connect(a.port, "127.0.0.4")
        opened.append(writer)
        assert await closed_by_peer(reader) == b""
        assert a.stats.refused_busy == 2
        # The held connections were never closed for the others' sake.
        assert all(not r.at_eof() for r in held)
        # Once they go, the slots are free again: b's link to a re-handshakes normally.
        for writer in opened[:2]:
            writer.close()
        await eventually(lambda: a._handshakes_open == 1, "closed handshakes released")
        reader, writer = await connect(a.port, "127.0.0.2")
        opened.append(writer)
        await eventually(lambda: a._handshakes_open == 2, "a new handshake admitted")
    finally:
        for writer in opened:
            writer.close()
        await links.stop()


async def test_the_limits_do_not_stop_a_legitimate_peer() -> None:
    limits = PeerLimits(handshakes_per_address=1, handshakes_total=1, handshake_frame=4096)
    links = await one_node(limits)
    try:
        for i in range(20):
            links.send("b", "a", i)
        await eventually(lambda: links.got("a", "b") == list(range(20)), "b's messages at a")
    finally:
        await links.stop()


async def test_a_join_hello_gets_the_same_small_frame_limit() -> None:
    links = await one_node(PeerLimits())
    try:
        a = links.transports["a"]
        reader, writer = await connect(a.port)
        writer.write(struct.pack(">I", 1 << 20) + JOIN)
        assert await closed_by_peer(reader) == b""
        writer.close()
        assert a.stats.refused_oversize == 1
    finally:
        await links.stop()


# --- the enclave's side of a connection the host holds -------------------------------------


class Sent:
    def __init__(self) -> None:
        self.notices: list[object] = []

    def notify(self, notice: object) -> None:
        self.notices.append(notice)


async def test_a_host_connection_may_hold_little_before_its_handshake() -> None:
    net = VirtualNet(handshake_limit=64 * 1024, reader_limit=1024 * 1024)
    net.circuit = Sent()  # type: ignore[assignment]
    readers: list[asyncio.StreamReader] = []

    async def handler(reader: asyncio.StreamReader, writer: object) -> None:
        readers.append(reader)
        await asyncio.sleep(10)

    net._handler = handler
    net.on_notice(Accepted(conn=1, peer_host="10.0.0.1", peer_port=5))
    await eventually(lambda: bool(readers), "the connection handed on")
    for _ in range(2):
        net.on_notice(Data(conn=1, data=b"x" * 32 * 1024))
    assert net.closed_over_limit == 0
    net.on_notice(Data(conn=1, data=b"x"))
    assert net.closed_over_limit == 1 and 1 not in net._conns
    with pytest.raises(ReadLimitExceeded):
        await readers[0].read(1)
    # After its handshake, a connection may hold a frame's worth.
    net.on_notice(Accepted(conn=2, peer_host="10.0.0.1", peer_port=6))
    await eventually(lambda: len(readers) == 2, "the second connection handed on")
    writer = net._conns[2].writer
    assert writer is not None
    net.handshake_done(writer)
    for _ in range(8):
        net.on_notice(Data(conn=2, data=b"x" * 64 * 1024))
    assert net.closed_over_limit == 1 and 2 in net._conns
    await net.stop()


# --- msgpack decoding of an attested peer's message ------------------------------------------


def nested_bomb(entries: int, inner: int) -> bytes:
    """A Raft message whose entries are arrays of empty arrays: 1 byte each on the wire,
    a Python list each once decoded."""
    entry = b"\xdc" + struct.pack(">H", inner) + b"\x90" * inner
    body = b"\xdc" + struct.pack(">H", entries) + entry * entries
    return b"\x9d" + b"\x01\x01\xa1b\xa1a\x01\x00\x00" + body + b"\x00\xc2\x00\xc0\xc4\x00"


def test_a_msgpack_bomb_is_refused_early() -> None:
    bomb = nested_bomb(2000, 4000)  # about 8 MiB: 8 million lists without the budget
    assert len(bomb) > 7 * 1024 * 1024
    started = time.process_time()
    with pytest.raises(TooManyItems, match="65536"):
        decode_message(bomb)
    assert time.process_time() - started < 1.0  # budget stops it; without it, seconds


def test_each_decode_limit_is_refused_by_name() -> None:
    limits = DecodeLimits(max_bytes=4096, max_bin=100, max_str=8, max_array=16, max_items=80)
    ok = Message(MessageType.APPEND, "b", "a", entries=(Entry(1, 1, data=b"x" * 100),))
    assert decode_message(encode_message(ok), limits=limits) == ok
    cases = {
        "max_bin": Message(MessageType.APPEND, "b", "a", entries=(Entry(1, 1, data=b"x" * 101),)),
        "max_str": Message(MessageType.HEARTBEAT, "b" * 9, "a"),
        "max_array": Message(
            MessageType.APPEND, "b", "a", entries=tuple(Entry(1, i) for i in range(17))
        ),
        "max_items": Message(
            MessageType.APPEND, "b", "a", entries=tuple(Entry(1, i) for i in range(16))
        ),
    }
    # An append of 16 entries is 1 + 13 + 1 + 16 + 16 * (1 + 4) = 111 items, over 80.
    for name, message in cases.items():
        with pytest.raises(CodecError):
            decode_message(encode_message(message), limits=limits)
        print(name, "refused")
    with pytest.raises(MessageTooLarge):
        decode_message(b"\0" * 4097, limits=limits)


def test_a_raft_append_of_the_largest_default_batch_decodes() -> None:
    batch = Message(
        MessageType.APPEND, "b", "a", entries=tuple(Entry(1, i, data=b"c" * 64) for i in range(512))
    )
    assert decode_message(encode_message(batch), limits=DECODE_LIMITS) == batch


# --- the settings ----------------------------------------------------------------------------


def test_the_limits_are_settings_with_defaults_and_checked_values() -> None:
    spec = LimitsSpec()
    limits = peer_limits(spec)
    assert limits.handshake_frame == 16 * 1024 and limits.frame == 8 * 1024 * 1024
    assert limits.handshake_timeout == 5.0 and limits.handshakes_per_address == 8
    assert limits.decode.max_items == spec.msgpack_max_items
    tuned = parse_config({"limits": {"handshake_frame_bytes": 8192, "handshakes_total": 10}})
    assert peer_limits(tuned.limits).handshake_frame == 8192
    assert peer_limits(tuned.limits).handshakes_total == 10
    with pytest.raises(ConfigError) as bad:
        parse_config({"limits": {"handshake_frame_bytes": 10, "frame_byts": 1}})
    problems = " ".join(bad.value.problems)
    assert "limits.handshake_frame_bytes" in problems and "limits.frame_byts" in problems


def test_a_circuit_record_bomb_from_the_host_is_refused_early() -> None:
    """The host's records to the enclave are msgpack too: the same kind of bomb (an event
    whose fields nest 8 million empty arrays) is refused before it is built."""
    inner = b"\xdc" + struct.pack(">H", 4000) + b"\x90" * 4000
    record = (
        b"\x83"
        + msgpack.packb("op")
        + msgpack.packb("event")
        + msgpack.packb("kind")
        + msgpack.packb("k")
        + msgpack.packb("fields")
        + b"\x81"
        + msgpack.packb("x")
        + b"\xdc"
        + struct.pack(">H", 2000)
        + inner * 2000
    )
    started = time.process_time()
    with pytest.raises(CircuitError, match="more than 262144 items"):
        circuit_decode(record)
    assert time.process_time() - started < 1.0
    # Legitimate records, the largest kinds included, still decode.
    chunk = Data(conn=1, data=b"x" * MAX_NET_CHUNK)
    assert circuit_decode(circuit_encode(chunk)) == chunk
    event = Event(kind="k", fields={"list": list(range(1000)), "map": {"a": {"b": [1]}}})
    assert circuit_decode(circuit_encode(event)) == event
