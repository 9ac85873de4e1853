"""How Raft messages travel between nodes: an interface, and a plain loopback TCP version.

``Transport.send`` is fire-and-forget and must never block or await: Raft tolerates lost
messages (it retries with heartbeats and appends), but a Raft loop stalled behind one slow or
dead peer would stall the whole cluster. So each peer has its own bounded outbound buffer; a
message that does not fit, or that is sent while the peer is unreachable, is dropped and
counted. The node will later plug its attested, encrypted channels in behind the same
interface; ``TcpTransport`` is the unauthenticated version for tests and benchmarks and binds
127.0.0.1 by default.

Wire format on a connection: a hello frame (magic + sender id), then frames of
``u32 big-endian length | encoded message``. The length is checked against the size limit
before the body is buffered, so a hostile peer cannot make the receiver allocate more than
one maximum-size message. Any framing or decoding error closes that connection (a byte stream
cannot be resynchronized); the sender reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from consensus.codec import DEFAULT_MAX_MESSAGE_BYTES, CodecError, decode_message, encode_message
from consensus.types import Message, NodeId

log = logging.getLogger(__name__)

#: Receives the messages decoded from one read, in order (a batch lets the driver run the core
#: once per read rather than once per message).
MessageHandler = Callable[[list[Message]], None]
Address = tuple[str, int]

_LEN = struct.Struct(">I")
_MAGIC = b"KMRAFT01"


class Transport(ABC):
    """Moves messages between Raft nodes. Implementations must not block in ``send``."""

    @abstractmethod
    async def start(self, handler: MessageHandler) -> None:
        """Begin delivering inbound messages addressed to this node to ``handler``, in batches."""

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Queue ``msg`` for ``msg.to``; may drop it (counted), never blocks."""

    def flush(self) -> None:  # noqa: B027 - an optional hook: most have nothing to flush
        """Put what ``send`` queued on the wire now, not at the end of this event-loop turn.

        The driver calls it after each batch of sends: a leader fsyncs right after sending,
        and messages still queued then would wait for the disk. A transport that writes in
        ``send`` has nothing to do.
        """

    @abstractmethod
    async def stop(self) -> None:
        """Close every connection and server; no tasks are left running."""


@dataclass
class TransportStats:
    sent: int = 0
    received: int = 0
    dropped_full: int = 0
    dropped_disconnected: int = 0
    dropped_oversize: int = 0
    rejected_frames: int = 0
    connects: int = 0


class _BadFrame(Exception):
    """The inbound byte stream cannot be trusted past this point."""


class _Inbound(asyncio.Protocol):
    """One accepted connection: parses frames and hands decoded messages to the handler."""

    def __init__(self, owner: TcpTransport) -> None:
        self._owner = owner
        self._buf = bytearray()
        self._hello = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._owner._inbound.add(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._owner._inbound.discard(self._transport)

    def _reject(self, why: str) -> None:
        self._owner.stats.rejected_frames += 1
        log.warning("%s: closing inbound connection: %s", self._owner.node_id, why)
        if self._transport is not None:
            self._transport.close()
        self._buf.clear()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        batch: list[Message] = []
        try:
            pos = self._parse(buf, batch)
            if pos:
                del buf[:pos]
        except _BadFrame as exc:
            self._reject(str(exc))
        if batch:  # messages before a bad frame were fine: deliver them
            self._owner._deliver(batch)

    def _parse(self, buf: bytearray, batch: list[Message]) -> int:
        """Decode every complete frame in ``buf`` into ``batch``; returns the bytes consumed."""
        owner = self._owner
        limit = owner.max_message_bytes
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > limit:
                owner.stats.dropped_oversize += 1
                raise _BadFrame(f"frame of {n} bytes exceeds the {limit}-byte limit")
            if end - pos - 4 < n:
                break
            body = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            if not self._hello:
                if not body.startswith(_MAGIC):
                    raise _BadFrame("bad hello")
                self._hello = True
                continue
            try:
                msg = decode_message(body, max_bytes=limit)
            except CodecError as exc:
                raise _BadFrame(f"undecodable message: {exc}") from exc
            if msg.to != owner.node_id:
                owner.stats.rejected_frames += 1
                continue
            owner.stats.received += 1
            batch.append(msg)
        return pos


class _Outbound(asyncio.Protocol):
    """Our connection to one peer; we only write to it."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Peer:
    """Per-peer outbound state: the connection (if any) and its connector task."""

    def __init__(self, node: NodeId, address: Address | None) -> None:
        self.node = node
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()


class TcpTransport(Transport):
    """Plain TCP between nodes (no authentication: loopback tests and benchmarks only).

    ``peers`` maps node ids to addresses; addresses may be added or changed later with
    ``set_peer`` (tests bind port 0 and learn the ports after start). ``max_buffer_bytes``
    bounds what may wait for one peer (queued plus unsent in the socket layer).
    """

    def __init__(
        self,
        node_id: NodeId,
        peers: Mapping[NodeId, Address | None] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_buffer_bytes: int = 16 * 1024 * 1024,
        reconnect_min: float = 0.01,
        reconnect_max: float = 0.2,
        connect_timeout: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.connect_timeout = connect_timeout
        self.stats = TransportStats()
        self._peers: dict[NodeId, _Peer] = {
            n: _Peer(n, a) for n, a in (peers or {}).items() if n != node_id
        }
        self._handler: MessageHandler | None = None
        self._server: asyncio.Server | None = None
        self._inbound: set[asyncio.Transport] = set()
        self._hello = _LEN.pack(len(_MAGIC) + len(node_id.encode())) + _MAGIC + node_id.encode()
        self._stopping = False

    @property
    def address(self) -> Address:
        """The bound listening address (valid after ``start``)."""
        return (self.host, self.port)

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        for peer in self._peers.values():
            peer.task = asyncio.create_task(self._connector(peer), name=f"raft-conn-{peer.node}")

    def set_peer(self, node: NodeId, address: Address) -> None:
        """Add a peer or change its address (the current connection is dropped)."""
        if node == self.node_id:
            return
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node, address)
            if self._server is not None and not self._stopping:
                peer.task = asyncio.create_task(self._connector(peer), name=f"raft-conn-{node}")
            return
        peer.address = address
        if peer.transport is not None:
            peer.transport.close()
        peer.changed.set()

    def _deliver(self, msgs: list[Message]) -> None:
        if self._handler is not None and not self._stopping:
            self._handler(msgs)

    def send(self, msg: Message) -> None:
        peer = self._peers.get(msg.to)
        if peer is None or peer.transport is None:
            self.stats.dropped_disconnected += 1
            return
        body = encode_message(msg)
        if len(body) > self.max_message_bytes:
            self.stats.dropped_oversize += 1
            log.warning(
                "%s: not sending %d-byte %s to %s (limit %d)",
                self.node_id,
                len(body),
                msg.type.name,
                msg.to,
                self.max_message_bytes,
            )
            return
        transport = peer.transport
        if transport.get_write_buffer_size() + len(body) + 4 > self.max_buffer_bytes:
            self.stats.dropped_full += 1
            return
        # Written at once: a Ready yields about one message per peer, and writing now saves an
        # event-loop turn of latency per hop. Whatever the socket does not take is kept in the
        # transport's buffer, which the check above bounds.
        transport.write(_LEN.pack(len(body)) + body)
        self.stats.sent += 1

    async def _connector(self, peer: _Peer) -> None:
        """Keep one outbound connection to ``peer`` open, reconnecting with backoff."""
        loop = asyncio.get_running_loop()
        delay = self.reconnect_min
        while not self._stopping:
            peer.changed.clear()
            if peer.address is None:
                await peer.changed.wait()
                continue
            try:
                transport, proto = await asyncio.wait_for(
                    loop.create_connection(_Outbound, *peer.address), self.connect_timeout
                )
            except (OSError, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(peer.changed.wait(), delay)
                delay = min(delay * 2, self.reconnect_max)
                continue
            delay = self.reconnect_min
            self.stats.connects += 1
            transport.write(self._hello)
            peer.transport = transport
            try:
                await proto.closed
            finally:
                peer.transport = None
                transport.close()

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for peer in self._peers.values():
            if peer.transport is not None:
                peer.transport.close()
            if peer.task is not None:
                peer.task.cancel()
        for t in list(self._inbound):
            t.close()
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # Let the transports' close callbacks run so no socket outlives stop().
        await asyncio.sleep(0)
