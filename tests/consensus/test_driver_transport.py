"""Loopback TCP transport: delivery, size limit on receive, hostile peers, drops never block."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from consensus.codec import encode_message
from consensus.transport import TcpTransport
from consensus.types import Entry, Message, MessageType


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        if pred() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    assert pred(), "timed out"


def msg(to: str, frm: str, i: int, size: int = 0) -> Message:
    return Message(
        MessageType.APPEND,
        to,
        frm,
        term=1,
        index=i,
        entries=(Entry(1, i + 1, data=b"x" * size),) if size else (),
    )


async def pair(**kw: int) -> tuple[TcpTransport, TcpTransport, list[Message]]:
    got: list[Message] = []
    a = TcpTransport("a", **kw)  # type: ignore[arg-type]
    b = TcpTransport("b", **kw)  # type: ignore[arg-type]
    await a.start(lambda m: None)
    await b.start(got.extend)
    a.set_peer("b", b.address)
    b.set_peer("a", a.address)
    await until(lambda: a.stats.connects == 1)
    return a, b, got


async def test_messages_arrive_in_order_and_bind_loopback() -> None:
    a, b, got = await pair()
    try:
        assert a.address[0] == "127.0.0.1" and b.address[1] > 0
        for i in range(500):
            a.send(msg("b", "a", i, size=i % 7))
        await until(lambda: len(got) == 500)
        assert [m.index for m in got] == list(range(500))
    finally:
        await a.stop()
        await b.stop()


async def test_oversize_frame_rejected_on_receive() -> None:
    a, b, got = await pair()
    b.max_message_bytes = 1000  # the receiver's limit is what protects it
    try:
        a.send(msg("b", "a", 1, size=5000))
        await until(lambda: b.stats.dropped_oversize == 1)
        assert got == []
        await until(lambda: a.stats.connects == 2)  # the sender reconnects and carries on
        a.send(msg("b", "a", 2))
        await until(lambda: len(got) == 1)
    finally:
        await a.stop()
        await b.stop()


async def test_garbage_and_misaddressed_input_is_rejected() -> None:
    got: list[Message] = []
    b = TcpTransport("b")
    await b.start(got.extend)
    try:
        _, w = await asyncio.open_connection(*b.address)
        w.write(struct.pack(">I", 4) + b"nope")  # bad hello
        await w.drain()
        await until(lambda: b.stats.rejected_frames == 1)
        w.close()
        _, w = await asyncio.open_connection(*b.address)
        hello = b"KMRAFT01x"
        bad = b"\x93\x01\x02\x03"
        wrong = encode_message(msg("someone-else", "x", 1))
        for body in (hello, wrong, bad):
            w.write(struct.pack(">I", len(body)) + body)
        await w.drain()
        await until(lambda: b.stats.rejected_frames == 3)
        assert got == []
        w.close()
    finally:
        await b.stop()


async def test_send_never_blocks_and_counts_drops() -> None:
    a = TcpTransport("a", {"b": ("127.0.0.1", 1)}, max_buffer_bytes=10_000)
    await a.start(lambda m: None)
    try:
        t0 = time.monotonic()
        for i in range(1000):
            a.send(msg("b", "a", i))  # nobody listens on port 1
        a.send(msg("nobody", "a", 0))
        assert time.monotonic() - t0 < 5
        assert a.stats.dropped_disconnected == 1001
    finally:
        await a.stop()

    # A connected peer that never reads: the bounded buffer fills and further sends drop.
    server_conns: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_conns.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a = TcpTransport("a", {"b": ("127.0.0.1", port)}, max_buffer_bytes=200_000)
    await a.start(lambda m: None)
    try:
        await until(lambda: a.stats.connects == 1)
        for i in range(2000):
            a.send(msg("b", "a", i, size=10_000))
            if i % 50 == 0:
                await asyncio.sleep(0)
        assert a.stats.dropped_full > 0
    finally:
        await a.stop()
        for w in server_conns:
            w.close()
        server.close()
        await server.wait_closed()
