"""Joining a cluster, from both sides of the attested join connection.

A joining node dials the members named in cluster.yaml (the leader they name first) until one
admits it: its KM enclave sends a join request (its addresses; its name and platform are the
enclave's own) and opens the answer, which installs the master secret inside the enclave when it
says ``admitted``. A member passes a request to the leader's logic: commit the member record,
make it a Raft voter, then have its enclave answer; the enclave seals an admission only if its
own committed membership holds the joiner on the platform its quote proved. In a governed
cluster (one with identities) only a node admitted at genesis (cluster.yaml) or by a passed
proposal becomes a member, with the addresses it was admitted with; until then it is pending:
it attests, it gets nothing, and it asks again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

from attest.certs import UNTRUSTED_ROOT
from attest.errors import AttestationError, UntrustedCertificate
from consensus.types import ConfChange, ConfChangeType, RaftError
from kmnode.km.commands import MemberAdd, MemberRecord, Refused, explain
from kmnode.km.enclave import EnclaveStateError, JoinReply, JoinRequest
from kmnode.km.peer_transport import Address
from kmnode.km.peer_wire import (
    CHANNEL,
    JOIN,
    PeerProtocolError,
    PeerRefused,
    encode_frame,
    expect,
    initiate,
)
from kmnode.km.vnet import StreamWriter

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 15.0
#: Largest join request or reply frame read from a peer.
MAX_JOIN_FRAME = 64 * 1024


class JoinRefused(Exception):
    """A member refused this node's join request, with the reason."""


T = TypeVar("T")


def _refused_as_protocol(open_frame: Callable[[int, bytes], T], session: int, frame: bytes) -> T:
    """Open a join frame in the enclave; a frame it refuses ends the connection like any other
    protocol error (the other side's fault, not this node's)."""
    try:
        return open_frame(session, frame)
    except EnclaveStateError as exc:
        raise PeerProtocolError(f"join frame refused: {exc}") from exc


class Joining:
    """The join protocol of one node (its joiner side and its member side)."""

    def __init__(self, node: KMNode) -> None:
        self.node = node

    async def join_loop(self) -> None:
        """Ask members (the leader they name first) until one admits this node.

        Bounded: about 1,000 rounds of at most 0.5 s. Unreachable members and "busy" or
        "redirect" answers are retried; a refusal (policy, identity) stops the node.
        """
        node = self.node
        by_name = {n.name: n for n in node.config.nodes if n.name != node.name}
        hint = ""
        delay = 0.05
        for _ in range(1000):
            order = ([by_name[hint]] if hint in by_name else []) + [
                n for n in by_name.values() if n.name != hint
            ]
            hint = ""
            for member in order:
                try:
                    answer = await self.join_via(member.name, (member.address, member.peer_port))
                except (OSError, TimeoutError, asyncio.IncompleteReadError, PeerProtocolError):
                    continue
                except (PeerRefused, JoinRefused, AttestationError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    # Ours refusing the member's certificate, or the member refusing ours (its
                    # refusal arrives as text).
                    if isinstance(exc, UntrustedCertificate) or UNTRUSTED_ROOT in str(exc):
                        reason += (
                            " (this node and the member trust different simulated vendor "
                            "roots: nodes with separate state directories must share one; "
                            "`kmctl hardware export FILE` where the cluster began, `kmctl "
                            "hardware import FILE` here, then start this node again)"
                        )
                    log.error("%s: join refused by %s: %s", node.name, member.name, reason)
                    node.publish_event("join.refused", by=member.name, reason=reason)
                    node.exit_code = 1
                    node.stop_requested.set()
                    return
                if answer is None:
                    node.joined.set()
                    node.enclave.check_binding()  # the log may have arrived before the secret
                    node.store_sealed_state()
                    node.publish_event("node.joined", via=member.name)
                    return
                hint = answer
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def join_via(self, peer: str, address: Address, *, refresh: bool = False) -> str | None:
        """One join attempt; returns None when admitted, else the leader hint to retry with."""
        enclave, spec = self.node.enclave, self.node.spec
        reader, writer = await asyncio.wait_for(self.node.net.open_connection(*address), 2.0)
        try:
            session = await initiate(enclave, reader, writer, JOIN, peer)
            try:
                request = enclave.join_request(
                    session, spec.address, spec.peer_port, spec.api_port, refresh=refresh
                )
                writer.write(encode_frame(CHANNEL, request))
                async with asyncio.timeout(JOIN_TIMEOUT):
                    frame = await expect(reader, CHANNEL, MAX_JOIN_FRAME)
                    reply = _refused_as_protocol(enclave.open_join_reply, session, frame)
                if reply.status in ("redirect", "busy"):
                    return reply.leader
                if reply.status != "admitted":
                    raise JoinRefused(reply.reason or reply.status)
                return None
            finally:
                enclave.close_session(session)
        finally:
            writer.close()

    async def refresh_membership(self) -> bool:
        """Learn the committed membership from another member: after a restart behind the
        cluster, this node's own state may not yet name members that joined meanwhile (a new
        leader among them), and it would refuse their links, so it could not catch up while
        one of them leads. The member's answer (sealed on the attested channel, from its
        committed state) is accepted until this node's own state reaches the index it was
        taken at, as a joiner's admission is. True if a member answered."""
        node = self.node
        addresses = node.addresses()
        for name in sorted(node.enclave.directory()):
            address = addresses.get(name)
            if address is None:
                continue
            try:
                if await self.join_via(name, address, refresh=True) is None:
                    return True
            except (
                OSError,
                TimeoutError,
                asyncio.IncompleteReadError,
                PeerProtocolError,
                PeerRefused,
                JoinRefused,
                AttestationError,
            ) as exc:
                log.info("%s: %s did not refresh the membership: %s", node.name, name, exc)
        return False

    async def serve(self, session: int, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        """Member side of a join: the joiner's quote already passed the replicated policy."""
        enclave = self.node.enclave
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                frame = await expect(reader, CHANNEL, MAX_JOIN_FRAME)
                request = _refused_as_protocol(enclave.open_join_request, session, frame)
                reply = await self.admit(request)
                try:
                    sealed = enclave.join_reply(session, reply)
                except EnclaveStateError as exc:
                    # The enclave did not find the admission it needs in its own state (it
                    # changed meanwhile): the joiner asks again.
                    sealed = enclave.join_reply(session, JoinReply("busy", reason=str(exc)))
                    reply = JoinReply("busy")
                writer.write(encode_frame(CHANNEL, sealed))
                if reply.status == "admitted" and not request.refresh:
                    self.node.publish_event(
                        "member.admitted", member=request.name, platform=request.platform_id
                    )
                await writer.drain()
        finally:
            enclave.close_session(session)

    async def admit(self, request: JoinRequest) -> JoinReply:
        """The leader commits the joiner as a member, then as a voter (one change at a time).

        A voter on its own platform asking again is admitted by any member, leader or not:
        it only learns the committed membership (it holds the secret already). A refresh from
        a node that is not such a voter is refused, never turned into a new member.
        """
        node = self.node
        if not node.enclave.state.cluster:
            # Genesis not applied yet, or our log still replaying: nothing to judge by yet.
            return JoinReply("busy", reason=f"{node.name} has not applied its ledger yet")
        driver = node.raft()
        peer_name, platform_id = request.name, request.platform_id
        existing = node.enclave.state.members.get(peer_name)
        voter = peer_name in driver.status.conf.voters
        if existing is not None and existing.platform_id == platform_id and voter:
            return JoinReply("admitted")
        if request.refresh:
            return JoinReply("refused", reason=f"{peer_name} is not a voter on that platform")
        if not driver.is_leader:
            return JoinReply("redirect", leader=driver.leader)
        if existing is None:
            state = node.enclave.state
            admitted = state.admitted.get(peer_name)
            if state.identities and (admitted is None or admitted.platform_id != platform_id):
                if peer_name in state.denied:
                    return JoinReply(
                        "refused", reason=f"a proposal to admit {peer_name} was rejected"
                    )
                # Pending: it attested, it gets nothing; it asks again until admitted.
                return JoinReply(
                    "busy",
                    reason=f"{peer_name} on {platform_id} is not admitted: an admin proposal "
                    "(kmctl members admit) must admit it",
                )
            try:
                record = admitted or MemberRecord(**request.record())
                command = MemberAdd(member=record)
            except ValidationError as exc:
                return JoinReply("refused", reason=explain(exc, tagged=False))
            result = await node.propose(command.encode())
            if isinstance(result, Refused):
                return JoinReply("refused", reason=result.error)
        elif existing.platform_id != platform_id:
            return JoinReply("refused", reason=f"{peer_name} is a member on another platform")
        if peer_name not in driver.status.conf.voters:
            try:
                await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, peer_name))
            except RaftError as exc:
                # Another membership change is still in flight (joins are single-server
                # changes, one at a time): the joiner retries shortly.
                return JoinReply("busy", reason=str(exc))
        return JoinReply("admitted")
