"""The node's peer sockets, held by the host; their bytes go to and from the KM enclave.

The KM enclave process decides everything about a peer connection (whom to dial, the
handshake, what a frame means); the host only does the I/O it is asked for: it listens on the
peer port, dials where the enclave says, and moves each connection's bytes over the circuit
(``kmnode.km_messages``: ``Listen``, ``Connect``, ``Accepted``, ``Data``, ``Closed``). What it
moves is sealed: quotes and handshake messages, AEAD frames. A connection whose peer does not
read (its unsent bytes pass ``MAX_UNSENT``) is dropped, as a kernel would reset it: the
enclave reconnects later, and Raft re-sends.
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


class PeerSockets:
    def __init__(self, name: str, notify: Callable[[Notice], None]) -> None:
        self.name = name
        self._notify = notify
        self._server: asyncio.Server | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)
        self.dropped_slow = 0

    # --- what the enclave asks ----------------------------------------------------------------

    async def listen(self, request: Listen) -> Listening:
        if self._server is not None:
            raise Failed.of("bad_request", "the peer port is already open")
        try:
            self._server = await asyncio.start_server(self._accept, request.host, request.port)
        except OSError as exc:
            raise Failed.of("unavailable", f"{request.host}:{request.port}: {exc}") from None
        return Listening(port=int(self._server.sockets[0].getsockname()[1]))

    async def connect(self, request: Connect) -> Connected:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(request.host, request.port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise Failed.of("unavailable", f"{type(exc).__name__}: {exc}") from None
        conn = next(self._ids)
        self._writers[conn] = writer
        # The reply leaves before any of the connection's data: the circuit keeps order.
        asyncio.get_running_loop().call_soon(self._start_reading, conn, reader)
        return Connected(conn=conn)

    def on_notice(self, notice: Notice) -> bool:
        """The enclave's bytes for a connection, or its close; False for other notices."""
        if isinstance(notice, Data):
            writer = self._writers.get(notice.conn)
            if writer is None or writer.is_closing():
                return True
            writer.write(notice.data)
            if writer.transport.get_write_buffer_size() > MAX_UNSENT:
                self.dropped_slow += 1
                log.warning("%s: a peer connection does not read; dropping it", self.name)
                self._close(notice.conn, tell=True)
        elif isinstance(notice, Closed):
            self._close(notice.conn, tell=False)
        else:
            return False
        return True

    # --- the sockets --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._ids)
        self._writers[conn] = writer
        host, port = writer.get_extra_info("peername", ("?", 0))[:2]
        self._notify(Accepted(conn=conn, peer_host=str(host), peer_port=int(port)))
        self._start_reading(conn, reader)

    def _start_reading(self, conn: int, reader: asyncio.StreamReader) -> None:
        if conn in self._writers:
            self._readers[conn] = asyncio.create_task(self._read(conn, reader))

    async def _read(self, conn: int, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(MAX_NET_CHUNK)
                if not data:
                    break
                self._notify(Data(conn=conn, data=data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._readers.pop(conn, None)
            self._close(conn, tell=True)

    def _close(self, conn: int, *, tell: bool) -> None:
        writer = self._writers.pop(conn, None)
        if writer is None:
            return
        writer.close()
        reader = self._readers.pop(conn, None)
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if tell:
            self._notify(Closed(conn=conn))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._writers):
            self._close(conn, tell=False)
        tasks = list(self._readers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


__all__ = ["PeerSockets"]
