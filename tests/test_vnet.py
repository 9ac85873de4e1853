"""Peer connections whose sockets the host holds: the enclave's streams over the circuit, and
what a hostile host can do with them (invent connections, replay accepts, refuse to dial)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kmnode.circuit import Circuit
from kmnode.host.sockets import PeerSockets
from kmnode.km.vnet import MAX_CONNS, StreamWriter, VirtualNet
from kmnode.km_messages import Accepted, Connect, Data, Failed, Listen, Notice, Reply, Request
from kmnode.ring import Ring

pytestmark = pytest.mark.timeout(30)


class Node:
    """A host (real sockets) and an enclave (virtual streams) joined by a real circuit."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{id(self)}"
        self.rings = [
            Ring.create(f"/kmsim-vt-a-{tag}", 1 << 22),
            Ring.create(f"/kmsim-vt-b-{tag}", 1 << 22),
        ]
        to_enclave, to_host = os.pipe(), os.pipe()
        self.fds = [*to_enclave, *to_host]
        self.net = VirtualNet()
        self.sockets = PeerSockets("km1", self._to_enclave)
        self.host = Circuit(
            self.rings[1],
            self.rings[0],
            bell_in=to_host[0],
            bell_out=to_enclave[1],
            on_request=self._host_request,
            on_notice=self.sockets.on_notice,
        )
        self.enclave = Circuit(
            self.rings[0],
            self.rings[1],
            bell_in=to_enclave[0],
            bell_out=to_host[1],
            on_request=self._refuse,
            on_notice=self.net.on_notice,
        )
        self.net.circuit = self.enclave

    def _to_enclave(self, notice: Notice) -> None:
        self.host.notify(notice)

    async def _host_request(self, request: Request) -> Reply:
        if isinstance(request, Listen):
            return await self.sockets.listen(request)
        if isinstance(request, Connect):
            return await self.sockets.connect(request)
        raise Failed.of("bad_request", "no")

    async def _refuse(self, request: Request) -> Reply:
        raise Failed.of("bad_request", "no")


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node()
    n.host.start()
    n.enclave.start()
    try:
        yield n
    finally:
        await n.net.stop()
        await n.sockets.stop()
        await n.host.close()
        await n.enclave.close()
        for ring in n.rings:
            ring.close()
        for fd in n.fds:
            os.close(fd)


async def echo(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
    writer.close()


async def test_streams_carry_large_writes_both_ways_and_end_with_eof(node: Node) -> None:
    port = await node.net.start_server(echo, "127.0.0.1", 0)
    assert port > 0
    reader, writer = await node.net.open_connection("127.0.0.1", port)
    payload = os.urandom(700_000)  # several circuit chunks
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    writer.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_the_host_refuses_what_it_cannot_do(node: Node) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot listen"):
            await node.net.start_server(echo, "127.0.0.1", taken.getsockname()[1])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        await node.net.open_connection("127.0.0.1", port)


async def test_invented_connections_are_bounded_and_replayed_accepts_refused(node: Node) -> None:
    handled: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        handled.append(writer)

    await node.net.start_server(handler, "127.0.0.1", 0)
    for conn in range(1, MAX_CONNS + 50):  # data for connections nobody opened
        node.net.on_notice(Data(conn=conn, data=b"x"))
    assert len(node.net._conns) == MAX_CONNS
    # An accept for a connection number already in use closes it instead of handing it on.
    node.net.on_notice(Accepted(conn=1, peer_host="127.0.0.1", peer_port=1))
    await asyncio.sleep(0.01)
    assert handled == [] and 1 not in node.net._conns
