"""Mutual attestation handshake: success, and each way a peer can be refused."""

from __future__ import annotations

import pytest

from attest import errors
from attest.handshake import Initiator, Responder

from .conftest import NOW, World


def run(world: World, initiator: Initiator, responder: Responder) -> tuple[bytes, bytes, bytes]:
    hello = initiator.start()
    answer = responder.receive(hello, NOW)
    assert answer is not None
    finish = initiator.receive(answer, NOW)
    assert responder.receive(finish, NOW) is None
    return hello, answer, finish


def test_handshake_establishes_a_channel_and_identifies_both_sides(world: World) -> None:
    initiator = Initiator(world.hs_config("a"), world.policy, "node-b")
    responder = Responder(world.hs_config("b"), world.policy)
    run(world, initiator, responder)
    assert initiator.done and responder.done
    assert initiator.result is not None and responder.result is not None
    assert initiator.result.peer.platform_id == "b"
    assert responder.result.peer.platform_id == "a"
    assert responder.result.peer_name == "node-a"
    assert initiator.result.transcript_hash == responder.result.transcript_hash
    to_b = initiator.result.channel.seal(b"raft append")
    assert responder.result.channel.open(to_b) == b"raft append"
    to_a = responder.result.channel.seal(b"ack")
    assert initiator.result.channel.open(to_a) == b"ack"


def test_two_sessions_derive_different_keys(world: World) -> None:
    results = []
    for _ in range(2):
        i = Initiator(world.hs_config("a"), world.policy, "node-b")
        r = Responder(world.hs_config("b"), world.policy)
        run(world, i, r)
        assert i.result is not None
        results.append(i.result)
    frame = results[0].channel.seal(b"x")
    with pytest.raises(errors.FrameTampered):
        results[1].channel.open(frame)


def test_replayed_answer_from_an_old_session_is_rejected(world: World) -> None:
    _, old_answer, _ = run(
        world,
        Initiator(world.hs_config("a"), world.policy, "node-b"),
        Responder(world.hs_config("b"), world.policy),
    )
    victim = Initiator(world.hs_config("a"), world.policy, "node-b")
    victim.start()
    with pytest.raises(errors.HandshakeReplay):
        victim.receive(old_answer, NOW)
    assert not victim.done


def test_replayed_finish_from_an_old_session_is_rejected(world: World) -> None:
    old_hello, _, old_finish = run(
        world,
        Initiator(world.hs_config("a"), world.policy, "node-b"),
        Responder(world.hs_config("b"), world.policy),
    )
    responder = Responder(world.hs_config("b"), world.policy)
    responder.receive(old_hello, NOW)
    with pytest.raises(errors.HandshakeReplay):
        responder.receive(old_finish, NOW)
    assert responder.result is None


def test_duplicate_message_is_unexpected(world: World) -> None:
    initiator = Initiator(world.hs_config("a"), world.policy, "node-b")
    responder = Responder(world.hs_config("b"), world.policy)
    hello, answer, _ = run(world, initiator, responder)
    with pytest.raises(errors.UnexpectedHandshakeMessage):
        initiator.receive(answer, NOW)
    with pytest.raises(errors.UnexpectedHandshakeMessage):
        responder.receive(hello, NOW)


def test_peer_presenting_another_nodes_quote_is_rejected(world: World) -> None:
    """Node c answers a call meant for node b, claiming b's name with its own genuine quote."""
    initiator = Initiator(world.hs_config("a"), world.policy, "node-b")
    impostor = Responder(world.hs_config("c", name="node-b"), world.policy)
    answer = impostor.receive(initiator.start(), NOW)
    assert answer is not None
    with pytest.raises(errors.PeerIdentityMismatch, match="platform 'c'"):
        initiator.receive(answer, NOW)


def test_initiator_claiming_another_nodes_name_is_rejected(world: World) -> None:
    impostor = Initiator(world.hs_config("c", name="node-a"), world.policy, "node-b")
    responder = Responder(world.hs_config("b"), world.policy)
    answer = responder.receive(impostor.start(), NOW)
    assert answer is not None
    finish = impostor.receive(answer, NOW)
    with pytest.raises(errors.PeerIdentityMismatch):
        responder.receive(finish, NOW)
    assert responder.result is None


def test_wrong_node_answering_is_rejected(world: World) -> None:
    initiator = Initiator(world.hs_config("a"), world.policy, "node-b")
    other = Responder(world.hs_config("c"), world.policy)
    answer = other.receive(initiator.start(), NOW)
    assert answer is not None
    with pytest.raises(errors.PeerIdentityMismatch, match="dialled"):
        initiator.receive(answer, NOW)


def test_unknown_initiator_is_refused_unless_joining_is_allowed(world: World) -> None:
    stranger = Initiator(
        world.hs_config("c", name="node-new", directory={"node-b": "b"}), world.policy, "node-b"
    )
    strict = Responder(world.hs_config("b", directory={"node-b": "b"}), world.policy)
    with pytest.raises(errors.UnknownPeer):
        strict.receive(stranger.start(), NOW)

    stranger = Initiator(
        world.hs_config("c", name="node-new", directory={"node-b": "b"}), world.policy, "node-b"
    )
    admitting = Responder(
        world.hs_config("b", directory={"node-b": "b"}, accept_unknown_peers=True), world.policy
    )
    run(world, stranger, admitting)
    assert admitting.result is not None and admitting.result.peer.platform_id == "c"


def test_peer_failing_policy_is_refused_with_the_reason(world: World) -> None:
    revoked = world.policy.revoke_platform("b")
    initiator = Initiator(world.hs_config("a"), revoked, "node-b")
    responder = Responder(world.hs_config("b"), world.policy)
    answer = responder.receive(initiator.start(), NOW)
    assert answer is not None
    with pytest.raises(errors.RevokedPlatform):
        initiator.receive(answer, NOW)
    with pytest.raises(errors.UnexpectedHandshakeMessage):
        initiator.receive(answer, NOW)


def test_dialling_an_unknown_node_is_refused(world: World) -> None:
    with pytest.raises(errors.UnknownPeer):
        Initiator(world.hs_config("a"), world.policy, "node-z")
