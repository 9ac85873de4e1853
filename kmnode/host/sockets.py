"""The node's peer sockets, held by the host; their bytes go to and from the KM enclave.

The KM enclave process decides everything about a peer connection (whom to dial, the
handshake, what a frame means); the host only does the I/O it is asked for: it listens on the
peer port, dials where the enclave says, and moves each connection's bytes over the circuit
(``kmnode.km_messages``: ``Listen``, ``Connect``, ``Accepted``, ``Data``, ``Closed``). What it
moves is sealed: quotes and handshake messages, AEAD frames. A connection whose peer does not
read (its unsent bytes pass ``MAX_UNSENT``) is dropped, as a kernel would reset it: the
enclave reconnects later, and Raft re-sends.

Connections are asyncio protocols, not streams: received bytes go onto the circuit from the
transport's callback, without a turn of a reader task in between, because every Raft message
crosses this relay twice (out of one node, into the other) and each saved turn is latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

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
#: Longest a dial may take (the enclave's own timeout is shorter; this bounds the host's task).
CONNECT_TIMEOUT = 2.0
#: Bytes a connection may have waiting for its peer before the host drops it.
MAX_UNSENT = 32 * 1024 * 1024


class _Link(asyncio.Protocol):
    """One peer connection: what arrives goes to the enclave as it arrives."""

    def __init__(self, sockets: PeerSockets, conn: int, *, announce: bool) -> None:
        self.sockets = sockets
        self.conn = conn
        self.announce = announce
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sockets._links[self.conn] = self
        if self.announce:  # accepted: tell the enclave before any of its data
            host, port = transport.get_extra_info("peername", ("?", 0))[:2]
            self.sockets._notify(Accepted(conn=self.conn, peer_host=str(host), peer_port=int(port)))

    def data_received(self, data: bytes) -> None:
        notify = self.sockets._notify
        for start in range(0, len(data), MAX_NET_CHUNK):
            notify(Data(conn=self.conn, data=data[start : start + MAX_NET_CHUNK]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sockets._links.pop(self.conn, None) is not None:
            self.sockets._notify(Closed(conn=self.conn))


class PeerSockets:
    def __init__(self, name: str, notify: Callable[[Notice], None]) -> None:
        self.name = name
        self._notify = notify
        self._server: asyncio.Server | None = None
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count(1)
        self.dropped_slow = 0

    # --- what the enclave asks ----------------------------------------------------------------

    async def listen(self, request: Listen) -> Listening:
        if self._server is not None:
            raise Failed.of("bad_request", "the peer port is already open")
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Link(self, next(self._ids), announce=True), request.host, request.port
            )
        except OSError as exc:
            raise Failed.of("unavailable", f"{request.host}:{request.port}: {exc}") from None
        return Listening(port=int(self._server.sockets[0].getsockname()[1]))

    async def connect(self, request: Connect) -> Connected:
        conn = next(self._ids)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Link(self, conn, announce=False), request.host, request.port
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            raise Failed.of("unavailable", f"{type(exc).__name__}: {exc}") from None
        # The reply is written now; data that arrives later is dispatched after it in order.
        return Connected(conn=conn)

    def on_notice(self, notice: Notice) -> bool:
        """The enclave's bytes for a connection, or its close; False for other notices."""
        if isinstance(notice, Data):
            link = self._links.get(notice.conn)
            if link is None or link.transport is None or link.transport.is_closing():
                return True
            link.transport.write(notice.data)
            if link.transport.get_write_buffer_size() > MAX_UNSENT:
                self.dropped_slow += 1
                log.warning("%s: a peer connection does not read; dropping it", self.name)
                link.transport.abort()  # connection_lost tells the enclave
        elif isinstance(notice, Closed):
            link = self._links.pop(notice.conn, None)
            if link is not None and link.transport is not None:
                link.transport.close()
        else:
            return False
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.abort()
        self._links.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


__all__ = ["PeerSockets"]
