"""Peer connections as the KM enclave process sees them: streams whose bytes the host moves.

The host owns the sockets (``kmnode.host.sockets``): it listens on the peer port, connects
where the enclave asks, and carries each connection's bytes over the circuit as ``Data``
records. This module gives the enclave's protocol code (``peer_transport``, ``peer_wire``,
``join``) the two calls it used to make to asyncio, ``start_server`` and ``open_connection``,
with the same reader and writer interface, so that code does not know who holds the socket.
Everything written is already sealed by the enclave (handshake messages with quotes, AEAD
frames); the host sees ciphertext and may drop, delay or reorder it like any network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from kmnode.circuit import Circuit
from kmnode.km_messages import (
    MAX_NET_CHUNK,
    Accepted,
    Closed,
    Connect,
    Connected,
    Data,
    Failed,
    Listen,
    Listening,
    Notice,
)

log = logging.getLogger(__name__)

#: Bytes a connection's reader holds unread once its handshake is complete (a frame being
#: read, and what arrived behind it).
READER_LIMIT = 16 * 1024 * 1024
#: Bytes it holds unread before that: an unauthenticated connection gets far less.
HANDSHAKE_READER_LIMIT = 1024 * 1024
#: Connections at once; beyond this, data for a connection not yet known is dropped (a host
#: inventing connection numbers must not make the enclave hold readers without end).
MAX_CONNS = 512


class ReadLimitExceeded(ConnectionError):
    """A connection sent more than its reader may hold unread; the connection is closed."""


class _WriteBuffer(Protocol):
    def get_write_buffer_size(self) -> int: ...


class StreamWriter(Protocol):
    """What the protocol code uses of a connection's writing half (asyncio's, or ours)."""

    @property
    def transport(self) -> _WriteBuffer: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


ConnectionHandler = Callable[[asyncio.StreamReader, StreamWriter], Coroutine[Any, Any, None]]


class Net(Protocol):
    """Where peer connections come from: asyncio itself, or the host through the circuit."""

    async def start_server(self, handler: ConnectionHandler, host: str, port: int) -> int:
        """Accept connections on (host, port) with ``handler``; the port actually bound."""
        ...

    async def stop_server(self) -> None: ...

    async def open_connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, StreamWriter]: ...

    def handshake_done(self, writer: StreamWriter) -> None:
        """The connection's handshake completed: it may now hold a whole frame unread."""
        ...


class AsyncioNet:
    """Real sockets in this process (tests of the protocol code)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None

    async def start_server(self, handler: ConnectionHandler, host: str, port: int) -> int:
        self._server = await asyncio.start_server(handler, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def open_connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, StreamWriter]:
        return await asyncio.open_connection(host, port)

    def handshake_done(self, writer: StreamWriter) -> None:
        """Nothing to do: asyncio's readers stop reading a socket whose buffer is full."""


class _Buffer:
    """``writer.transport`` of a virtual connection: the host buffers, not us."""

    def get_write_buffer_size(self) -> int:
        return 0


class VirtualWriter:
    """The writing half of one connection the host holds (asyncio's StreamWriter's API)."""

    def __init__(self, net: VirtualNet, conn: int, peer: tuple[str, int]) -> None:
        self._net = net
        self.conn = conn
        self._peer = peer
        self._closing = False
        self.transport = _Buffer()

    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_NET_CHUNK):
            self._net.send(Data(conn=self.conn, data=bytes(view[start : start + MAX_NET_CHUNK])))

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._net.close(self.conn)

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default


class _Conn:
    def __init__(self, limit: int) -> None:
        self.reader = asyncio.StreamReader(limit=READER_LIMIT)
        self.writer: VirtualWriter | None = None
        #: Unread bytes this connection may hold (raised when its handshake completes).
        self.limit = limit


class VirtualNet:
    """Connections whose sockets the host holds; fed by the circuit's ``net`` notices.

    A connection may hold ``handshake_limit`` unread bytes until ``handshake_done`` says its
    handshake completed, ``reader_limit`` after; past its limit it is closed (its reader
    raises ``ReadLimitExceeded``) and counted in ``closed_over_limit``. Nothing here waits
    for the host to stop sending: the host is untrusted, so holding less is the only defence.
    """

    def __init__(
        self, handshake_limit: int = HANDSHAKE_READER_LIMIT, reader_limit: int = READER_LIMIT
    ) -> None:
        self.handshake_limit = handshake_limit
        self.reader_limit = reader_limit
        self.closed_over_limit = 0
        self.circuit: Circuit | None = None
        self._conns: dict[int, _Conn] = {}
        self._handler: ConnectionHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _circuit(self) -> Circuit:
        if self.circuit is None:
            raise ConnectionError("the circuit to the host is not up")
        return self.circuit

    def send(self, notice: Notice) -> None:
        self._circuit().notify(notice)

    def close(self, conn: int) -> None:
        state = self._conns.pop(conn, None)
        if state is not None:
            state.reader.feed_eof()
        if self.circuit is not None:
            self.circuit.notify(Closed(conn=conn))

    # --- the two calls the protocol code makes ------------------------------------------------

    async def start_server(self, handler: ConnectionHandler, host: str, port: int) -> int:
        self._handler = handler
        try:
            reply = await self._circuit().call(Listen(host=host, port=port), Listening)
        except Failed as exc:
            raise OSError(f"the host cannot listen on {host}:{port}: {exc}") from None
        return reply.port

    async def stop_server(self) -> None:
        """Stop handing accepted connections on (the host closes the port when it stops)."""
        self._handler = None

    async def open_connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, StreamWriter]:
        try:
            reply = await self._circuit().call(Connect(host=host, port=port), Connected)
        except Failed as exc:
            raise ConnectionRefusedError(f"{host}:{port}: {exc}") from None
        state = self._conns.setdefault(reply.conn, _Conn(self.handshake_limit))
        state.writer = VirtualWriter(self, reply.conn, (host, port))
        return state.reader, state.writer

    def handshake_done(self, writer: StreamWriter) -> None:
        state = self._conns.get(getattr(writer, "conn", -1))
        if state is not None and state.writer is writer:
            state.limit = self.reader_limit

    # --- what the host reports ----------------------------------------------------------------

    def on_notice(self, notice: Notice) -> bool:
        """Handle a ``net`` notice; False if ``notice`` is not one."""
        if isinstance(notice, Data):
            if notice.conn not in self._conns and len(self._conns) >= MAX_CONNS:
                return True
            # Data may arrive before ``open_connection`` has seen its reply: keep it.
            state = self._conns.setdefault(notice.conn, _Conn(self.handshake_limit))
            unread = len(state.reader._buffer)  # type: ignore[attr-defined]
            if unread + len(notice.data) > state.limit:
                self.closed_over_limit += 1
                reason = f"connection {notice.conn} sent more than {state.limit} unread bytes"
                state.reader.set_exception(ReadLimitExceeded(reason))
                if state.writer is not None:
                    state.writer._closing = True
                self.close(notice.conn)
            else:
                state.reader.feed_data(notice.data)
        elif isinstance(notice, Closed):
            gone = self._conns.pop(notice.conn, None)
            if gone is not None:
                gone.reader.feed_eof()
                if gone.writer is not None:
                    gone.writer._closing = True
        elif isinstance(notice, Accepted):
            if notice.conn in self._conns or len(self._conns) >= MAX_CONNS:
                log.warning("refused an accepted connection %d from the host", notice.conn)
                self.close(notice.conn)
                return True
            state = self._conns.setdefault(notice.conn, _Conn(self.handshake_limit))
            writer = VirtualWriter(self, notice.conn, (notice.peer_host, notice.peer_port))
            state.writer = writer
            if self._handler is None:
                writer.close()
            else:
                task = asyncio.create_task(self._handler(state.reader, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            return False
        return True

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self._conns):
            self.close(conn)


__all__ = [
    "AsyncioNet",
    "ConnectionHandler",
    "Net",
    "ReadLimitExceeded",
    "StreamWriter",
    "VirtualNet",
    "VirtualWriter",
]
