"""Raft over attested channels: the node's implementation of ``consensus.transport.Transport``.

Each node keeps one outbound connection per peer for the messages it sends, and accepts inbound
connections for the messages it receives (the same shape as the plain ``TcpTransport``). Every
connection starts with a mutual attestation handshake run by the KM enclave; after it, each
Raft message travels as one channel frame, and an inbound message is accepted only if its
``frm`` is the node the handshake proved the peer to be. ``send`` never blocks: frames sent
in one event-loop turn are written to the connection together, at ``flush`` (which the Raft
driver calls after each batch of sends) or at the end of the turn, whichever comes first; what
the socket does not take waits in the connection's own buffer, bounded per peer, and what does
not fit or has no connection is dropped and counted, which Raft tolerates (it retries).

Nothing an unauthenticated connection sends is trusted with more than ``PeerLimits`` allows:
small handshake frames, one deadline for the whole handshake, and only a few incomplete
handshakes per remote address and altogether (a connection past either is closed before
anything is read from it). When the committed membership or policy changes, ``revalidate``
closes every link, inbound and outbound, whose peer the enclave no longer accepts.

The explicit flush matters for latency: the driver sends a leader's appends and then fsyncs
inline, so frames left for a writer task, or for the end of the turn, would only leave after
that fsync, and every follower's write would wait for it. Writing each frame at once instead
would cost a system call per message under load (forwarded proposals come many per turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from attest.errors import AttestationError
from consensus.codec import message_size
from consensus.transport import MessageHandler, Transport
from consensus.types import Message, NodeId
from kmnode.km.enclave import FrameRefused
from kmnode.km.peer_wire import (
    CHANNEL,
    DEFAULT_LIMITS,
    JOIN,
    RAFT,
    EnclaveSessions,
    FrameTooLarge,
    PeerLimits,
    PeerProtocolError,
    PeerRefused,
    channel_frame_size,
    encode_frame,
    initiate,
    read_frame,
    respond,
    split_frames,
)
from kmnode.km.vnet import AsyncioNet, Net, ReadLimitExceeded, StreamWriter

log = logging.getLogger(__name__)

Address = tuple[str, int]
#: Called for a verified join connection: (session, reader, writer). It owns the connection.
JoinHandler = Callable[[int, asyncio.StreamReader, StreamWriter], Awaitable[None]]
#: Called when a peer is refused: (claimed name or address, reason).
RefusalHandler = Callable[[str, str], None]


class FaultDecision(Protocol):
    @property
    def drop(self) -> bool: ...

    @property
    def delay(self) -> float: ...

    @property
    def duplicate(self) -> bool: ...


class LinkFaults(Protocol):
    """Injected faults on outbound links (chaos testing): see kmnode.linkfaults."""

    def decide(self, peer: str) -> FaultDecision: ...


@dataclass
class PeerLinkStats:
    sent: int = 0
    received: int = 0
    dropped_disconnected: int = 0
    dropped_full: int = 0
    handshakes: int = 0
    refused: int = 0
    dropped_fault: int = 0
    #: Inbound connections closed at once: too many incomplete handshakes from their address
    #: or altogether (``PeerLimits.handshakes_per_address``, ``handshakes_total``).
    refused_busy: int = 0
    #: Connections closed for sending more than a limit allows (a frame too large for its
    #: stage, or unread bytes past ``handshake_buffer`` before the handshake completed).
    refused_oversize: int = 0
    #: Handshakes that did not complete within ``handshake_timeout``.
    handshake_timeouts: int = 0
    #: Established links closed because the committed membership or policy no longer
    #: accepts their peer (``revalidate``).
    revoked: int = 0


class _Peer:
    def __init__(self, node: NodeId) -> None:
        self.node = node
        self.session: int | None = None
        self.writer: StreamWriter | None = None
        #: Sealed frames of this turn, written by ``flush``, and their size.
        self.unflushed: list[bytes] = []
        self.unflushed_bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.platform_id = ""


class AttestedTransport(Transport):
    def __init__(
        self,
        node_id: NodeId,
        enclave: EnclaveSessions,
        *,
        addresses: Callable[[], dict[NodeId, Address]],
        host: str,
        port: int,
        on_join: JoinHandler | None = None,
        on_refused: RefusalHandler | None = None,
        limits: PeerLimits = DEFAULT_LIMITS,
        max_buffer_bytes: int = 16 * 1024 * 1024,
        reconnect_max: float = 0.5,
        net: Net | None = None,
    ) -> None:
        self.node_id = node_id
        #: Where connections come from: the host's sockets through the circuit in a node,
        #: asyncio's own in tests of this module.
        self.net: Net = net if net is not None else AsyncioNet()
        self.enclave = enclave
        self.addresses = addresses
        self.host = host
        self.port = port
        self.on_join = on_join
        self.on_refused = on_refused
        self.limits = limits
        self.max_frame = limits.frame
        self.max_buffer_bytes = max_buffer_bytes
        self.reconnect_max = reconnect_max
        self.stats = PeerLinkStats()
        #: Fault rules for chaos runs; None in normal operation.
        self.faults: LinkFaults | None = None
        self._peers: dict[NodeId, _Peer] = {}
        self._handler: MessageHandler | None = None
        self._listening = False
        self._inbound: set[asyncio.Task[None]] = set()
        #: Established inbound Raft links: session -> the task reading it.
        self._inbound_sessions: dict[int, asyncio.Task[None]] = {}
        #: Incomplete inbound handshakes per remote address (absent when none), and in all.
        self._handshaking: dict[str, int] = {}
        self._handshakes_open = 0
        self._flush_scheduled = False
        self._stopping = False

    # --- lifecycle --------------------------------------------------------------------------

    async def listen(self) -> None:
        """Open the peer port (before Raft starts, so joins can be served)."""
        if not self._listening:
            self.port = await self.net.start_server(self._accept, self.host, self.port)
            self._listening = True

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler
        await self.listen()
        self.refresh_peers()

    def refresh_peers(self) -> None:
        """Connect to peers that appeared in the membership; drop those that left."""
        if self._stopping or self._handler is None:
            return
        wanted = {n for n in self.addresses() if n != self.node_id}
        for node in wanted - self._peers.keys():
            peer = self._peers[node] = _Peer(node)
            peer.task = asyncio.create_task(self._connector(peer), name=f"peer-{node}")
        for node in self._peers.keys() - wanted:
            peer = self._peers.pop(node)
            if peer.task is not None:
                peer.task.cancel()
            if peer.writer is not None:
                peer.writer.close()

    def revalidate(self) -> int:
        """Close every established link whose peer the enclave no longer accepts (it left
        the committed membership, or the policy now refuses its platform or measurement),
        inbound and outbound, and connect to new members; how many links were closed. Called
        whenever the membership or the policy changes."""
        closed = 0
        for peer in self._peers.values():
            if peer.session is not None and self._revoked(peer.session):
                self._drop_link(peer)
                closed += 1
        for session, task in list(self._inbound_sessions.items()):
            if self._revoked(session):
                del self._inbound_sessions[session]
                task.cancel()  # its reader ends; the connection closes with it
                closed += 1
        self.refresh_peers()
        return closed

    def _revoked(self, session: int) -> bool:
        """Whether the enclave refuses the session now; if so it is closed and counted."""
        reason = self.enclave.session_refusal(session)
        if reason:
            self.stats.revoked += 1
            log.warning("%s: closing a link: %s", self.node_id, reason)
            self.enclave.close_session(session)
        return bool(reason)

    @staticmethod
    def _drop_link(peer: _Peer) -> None:
        """Take an outbound link out of use at once (its pump ends when the socket closes)."""
        if peer.writer is not None:
            peer.writer.close()
        peer.session = peer.writer = None
        peer.unflushed, peer.unflushed_bytes = [], 0

    def attested_peers(self) -> dict[NodeId, str]:
        """Peers with a live attested outbound channel, and their verified platform ids."""
        return {n: p.platform_id for n, p in self._peers.items() if p.session is not None}

    async def stop(self) -> None:
        self._stopping = True
        if self._listening:
            await self.net.stop_server()
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        tasks += list(self._inbound)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self._peers.values():
            if peer.writer is not None:
                peer.writer.close()

    # --- sending ----------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        faults = self.faults
        if faults is not None:
            decision = faults.decide(msg.to)
            if decision.drop:
                self.stats.dropped_fault += 1
                return
            copies = 2 if decision.duplicate else 1
            if decision.delay > 0:
                loop = asyncio.get_running_loop()
                for _ in range(copies):
                    loop.call_later(decision.delay, self._enqueue, msg)
                return
            for _ in range(copies - 1):
                self._enqueue(msg)
        self._enqueue(msg)

    def _enqueue(self, msg: Message) -> None:
        """Seal ``msg`` and buffer it for this turn's ``flush``; sealing happens here, in write
        order, so a delayed message takes the channel counter of the moment it is really sent."""
        if self._stopping:
            return
        peer = self._peers.get(msg.to)
        writer = peer.writer if peer is not None else None
        if peer is None or peer.session is None or writer is None or writer.is_closing():
            self.stats.dropped_disconnected += 1
            return
        unsent = writer.transport.get_write_buffer_size() + peer.unflushed_bytes
        if unsent + channel_frame_size(message_size(msg)) > self.max_buffer_bytes:
            # Dropped before sealing: a sealed frame that is never sent would leave a gap in
            # the channel's counters, and the peer would refuse the whole connection.
            self.stats.dropped_full += 1
            return
        try:
            sealed = self.enclave.seal_raft(peer.session, msg)
        except FrameRefused:
            # The enclave no longer accepts this peer (membership or policy changed since
            # the last ``revalidate``): the link goes, and Raft's message with it.
            self.stats.dropped_disconnected += 1
            self._revoked(peer.session)
            self._drop_link(peer)
            return
        frame = encode_frame(CHANNEL, sealed)
        peer.unflushed.append(frame)
        peer.unflushed_bytes += len(frame)
        self.stats.sent += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every peer's frames of this turn, one write per peer."""
        self._flush_scheduled = False
        for peer in self._peers.values():
            if peer.unflushed:
                frames = peer.unflushed
                peer.unflushed, peer.unflushed_bytes = [], 0
                # A link that died since these were sealed takes its session (and the
                # counters the frames were sealed under) with it: they go nowhere.
                if peer.writer is not None and not peer.writer.is_closing():
                    peer.writer.write(b"".join(frames))

    async def _connector(self, peer: _Peer) -> None:
        delay = 0.02
        while not self._stopping:
            address = self.addresses().get(peer.node)
            if address is None:
                return
            try:
                reader, writer = await asyncio.wait_for(self.net.open_connection(*address), 1.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
                continue
            try:
                session = await initiate(self.enclave, reader, writer, RAFT, peer.node, self.limits)
                self.net.handshake_done(writer)
                peer.platform_id = self.enclave.session_peer(session)[1]
                self.stats.handshakes += 1
                delay = 0.02
                await self._pump(peer, session, reader, writer)
            except (AttestationError, PeerRefused, PeerProtocolError) as exc:
                self.stats.refused += 1
                log.warning("%s: link to %s refused: %s", self.node_id, peer.node, exc)
                if self.on_refused is not None:
                    self.on_refused(peer.node, f"{type(exc).__name__}: {exc}")
                delay = self.reconnect_max
            except ReadLimitExceeded:
                self.stats.refused_oversize += 1
            except TimeoutError:  # only the handshake has a deadline here
                self.stats.handshake_timeouts += 1
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(delay)

    async def _pump(
        self,
        peer: _Peer,
        session: int,
        reader: asyncio.StreamReader,
        writer: StreamWriter,
    ) -> None:
        """Offer the link to ``send`` until the connection fails (the responder never sends
        after its part of the handshake, so any read completing means the link is gone)."""
        peer.session, peer.writer = session, writer
        try:
            await reader.read(1)
        finally:
            peer.session = peer.writer = None
            peer.unflushed, peer.unflushed_bytes = [], 0
            self.enclave.close_session(session)

    # --- receiving --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        host, port = writer.get_extra_info("peername", ("?", 0))[:2]
        address = str(host)
        if not self._admit_handshake(address):
            self.stats.refused_busy += 1
            writer.close()
            return
        self._inbound.add(task)
        peer_label = f"{host}:{port}"
        handshaking = True
        try:
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    kind, hello = await read_frame(reader, self.limits.handshake_frame)
                    if kind not in (RAFT, JOIN) or (kind == JOIN and self.on_join is None):
                        raise PeerProtocolError(f"unexpected first frame {kind!r}")
                    session = await respond(self.enclave, reader, writer, hello, kind, self.limits)
            except TimeoutError:
                self.stats.handshake_timeouts += 1
                return
            handshaking = False
            self._handshake_over(address)
            self.net.handshake_done(writer)
            if kind == JOIN:
                assert self.on_join is not None
                await self.on_join(session, reader, writer)
                return
            self._inbound_sessions[session] = task
            await self._receive(session, reader)
        except (AttestationError, PeerProtocolError) as exc:
            self.stats.refused += 1
            self.stats.refused_oversize += isinstance(exc, FrameTooLarge)
            log.warning("%s: refused connection from %s: %s", self.node_id, peer_label, exc)
            if self.on_refused is not None:
                self.on_refused(peer_label, f"{type(exc).__name__}: {exc}")
        except ReadLimitExceeded:
            self.stats.refused_oversize += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError, PeerRefused):
            pass
        except asyncio.CancelledError:
            # Shutdown, or ``revalidate`` closing the link: end quietly. Re-raising would make
            # asyncio's stream callback log the cancellation of this handler as an error.
            pass
        finally:
            if handshaking:
                self._handshake_over(address)
            writer.close()
            self._inbound.discard(task)

    def _admit_handshake(self, address: str) -> bool:
        """Count one more incomplete handshake from ``address``, if the limits allow it."""
        limits = self.limits
        if (
            self._handshaking.get(address, 0) >= limits.handshakes_per_address
            or self._handshakes_open >= limits.handshakes_total
        ):
            return False
        self._handshaking[address] = self._handshaking.get(address, 0) + 1
        self._handshakes_open += 1
        return True

    def _handshake_over(self, address: str) -> None:
        self._handshakes_open -= 1
        left = self._handshaking.get(address, 0) - 1
        if left > 0:
            self._handshaking[address] = left
        else:
            self._handshaking.pop(address, None)

    async def _receive(self, session: int, reader: asyncio.StreamReader) -> None:
        """Deliver inbound messages in batches: every complete frame of a read goes to Raft
        at once, so the driver steps them in one pass (and one persist) instead of one each."""
        peer_name, _ = self.enclave.session_peer(session)
        buffer = bytearray()
        try:
            while not self._stopping:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    return
                buffer += chunk
                if len(buffer) > self.max_frame + 16 + (1 << 20):
                    raise PeerProtocolError(f"{peer_name} sent more than one frame's worth")
                batch = [
                    self._open(session, peer_name, kind, payload)
                    for kind, payload in split_frames(buffer, self.max_frame)
                ]
                if batch:
                    self.stats.received += len(batch)
                    if self._handler is not None:
                        self._handler(batch)
        finally:
            self._inbound_sessions.pop(session, None)
            self.enclave.close_session(session)

    def _open(self, session: int, peer_name: str, kind: bytes, payload: bytes) -> Message:
        if kind != CHANNEL:
            raise PeerProtocolError(f"expected channel frames, got {kind!r}")
        try:
            return self.enclave.open_raft(session, payload)
        except FrameRefused as exc:
            raise PeerProtocolError(str(exc)) from exc
