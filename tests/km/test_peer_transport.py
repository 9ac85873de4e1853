"""Raft messages over attested channels between two in-process nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier
from consensus.codec import message_size
from consensus.types import Message, MessageType
from kmnode.km.enclave import KMEnclave
from kmnode.km.peer_transport import AttestedTransport
from kmnode.km.peer_wire import channel_frame_size
from tests.host import eventually
from tests.km.peer_links import Transports

pytestmark = pytest.mark.timeout(60)

VENDOR = VendorRoot(b"vendor".ljust(32, b"\0"))
KM = EnclaveIdentity(measure_sources({"km": b"code"}), signer_id("t"), 1, 1)
ROGUE = EnclaveIdentity(measure_sources({"km": b"rogue"}), signer_id("t"), 1, 1)
POLICY = Policy(km_measurements=frozenset({KM.measurement}), min_svn=1)
DIRECTORY = {"a": "pa", "b": "pb"}


@dataclass
class Decision:
    drop: bool = False
    delay: float = 0.0
    duplicate: bool = False


class FixedFaults:
    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def decide(self, peer: str) -> Decision:
        return self.decision


def enclave(name: str, identity: EnclaveIdentity = KM) -> KMEnclave:
    platform = Platform(f"p{name}", TcbStatus.UP_TO_DATE, name.encode().ljust(32, b"\0"), VENDOR)
    km = KMEnclave(
        name, platform.enclave(identity), QuoteVerifier(VENDOR.public_key), bootstrap=DIRECTORY
    )
    km.state.policy = POLICY
    return km


class Pair(Transports):
    def __init__(self, b_identity: EnclaveIdentity = KM) -> None:
        self.received: dict[str, list[Message]] = {"a": [], "b": []}
        self.ports: dict[str, int] = {}
        self.transports = {
            name: AttestedTransport(
                name, enclave(name, KM if name == "a" else b_identity),
                addresses=lambda: {n: ("127.0.0.1", p) for n, p in self.ports.items()},
                host="127.0.0.1", port=0,
            )
            for name in ("a", "b")
        }  # fmt: skip


def heartbeat(i: int) -> Message:
    return Message(MessageType.HEARTBEAT, to="b", frm="a", term=1, commit=i)


async def test_messages_flow_after_mutual_attestation() -> None:
    pair = Pair()
    await pair.start()
    try:
        a = pair.transports["a"]
        await eventually(lambda: "b" in a.attested_peers(), "a's attested link to b")
        assert a.attested_peers() == {"b": "pb"}
        for i in range(50):
            a.send(heartbeat(i))
        await eventually(lambda: len(pair.received["b"]) == 50, "50 messages at b")
        assert [m.commit for m in pair.received["b"]] == list(range(50))
    finally:
        await pair.stop()


async def test_injected_drop_and_duplicate() -> None:
    pair = Pair()
    await pair.start()
    try:
        a = pair.transports["a"]
        await eventually(lambda: "b" in a.attested_peers(), "attested link")
        a.faults = FixedFaults(Decision(drop=True))
        for i in range(10):
            a.send(heartbeat(i))
        assert a.stats.dropped_fault == 10
        a.faults = FixedFaults(Decision(duplicate=True, delay=0.01))
        a.send(heartbeat(99))
        await eventually(lambda: len(pair.received["b"]) == 2, "duplicated message")
        assert [m.commit for m in pair.received["b"]] == [99, 99]
    finally:
        await pair.stop()


async def test_a_full_send_buffer_drops_messages_without_breaking_the_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages that do not fit are dropped before sealing: the channel's counters stay
    gapless, so the peer keeps the connection and everything sent later arrives."""
    pair = Pair()
    await pair.start()
    try:
        a, b = pair.transports["a"], pair.transports["b"]
        await eventually(lambda: "b" in a.attested_peers(), "attested link")
        frame = channel_frame_size(message_size(heartbeat(0)))  # what the sender reckons
        a.max_buffer_bytes = 3 * frame
        writer = a._peers["b"].writer
        assert writer is not None
        # A peer that stopped reading: loopback sockets take megabytes before the
        # connection's own buffer grows, so its fill level is what is faked here.
        unsent = [3 * frame]
        monkeypatch.setattr(writer.transport, "get_write_buffer_size", lambda: unsent[0])
        for i in range(5):
            a.send(heartbeat(i))  # no room for a fourth frame: dropped
        assert a.stats.dropped_full == 5
        unsent[0] = 0
        for i in range(10, 13):
            a.send(heartbeat(i))
        await eventually(lambda: len(pair.received["b"]) == 3, "the three sent with room")
        assert [m.commit for m in pair.received["b"]] == [10, 11, 12]
        assert a.stats.dropped_full == 5
        assert b.stats.refused == 0 and a.stats.handshakes == 1
    finally:
        await pair.stop()


async def test_peer_with_unknown_measurement_never_gets_a_link() -> None:
    pair = Pair(b_identity=ROGUE)
    await pair.start()
    try:
        a = pair.transports["a"]
        await eventually(lambda: a.stats.refused >= 1, "a refusing b's quote")
        a.send(heartbeat(1))
        await asyncio.sleep(0.2)
        assert a.attested_peers() == {} and pair.received["b"] == []
    finally:
        await pair.stop()
