"""Linearizable read index and leadership transfer."""

from __future__ import annotations

import pytest

from consensus.sim.harness import Harness
from consensus.types import MessageType, NotLeader, ReadState, Role

HEARTBEAT = MessageType.HEARTBEAT


# -- read index ------------------------------------------------------------------------------


def test_leader_read_waits_for_a_heartbeat_quorum() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    h.stabilize()
    h.nodes["a"].read_index(b"r1")
    h.process("a")
    assert h.read_states["a"] == []  # not before a quorum confirmed a still leads
    heartbeats = h.take(lambda m: m.type == HEARTBEAT)
    assert len(heartbeats) == 2
    h.deliver(heartbeats[:1])  # one follower's answer + the leader itself = 2 of 3
    h.stabilize()
    assert h.read_states["a"] == [ReadState(index=h.nodes["a"].log.commit, request_ctx=b"r1")]


def test_read_waits_until_the_leader_committed_in_its_term() -> None:
    h = Harness(["a", "b", "c"])
    h.campaign("a")
    h.stabilize(accept=lambda m: m.type != MessageType.APPEND)
    a = h.nodes["a"]
    assert a.role == Role.LEADER and a.log.commit == 0
    a.read_index(b"early")
    h.process("a")
    h.deliver(h.take(lambda m: m.type == HEARTBEAT))
    h.stabilize(accept=lambda m: m.type != MessageType.APPEND)
    assert h.read_states["a"] == []  # the NOOP of term 1 has not committed yet
    h.stabilize()
    assert h.read_states["a"] == [ReadState(index=1, request_ctx=b"early")]


def test_follower_read_is_forwarded_to_the_leader() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    h.stabilize()
    h.nodes["c"].read_index(b"from-c")
    h.process("c")
    h.stabilize()
    assert h.read_states["c"] == [ReadState(index=h.nodes["a"].log.commit, request_ctx=b"from-c")]
    assert h.read_states["a"] == []


def test_deposed_leader_cannot_confirm_a_read() -> None:
    h = Harness(["a", "b", "c"], check_quorum=False)
    h.elect("a")
    h.isolate("a")
    h.tick("b", 10)
    h.elect("b")
    h.propose("b", b"newer")
    h.stabilize()
    # a still thinks it leads; without a quorum of answers it must not answer the read.
    h.nodes["a"].read_index(b"stale?")
    h.process("a")
    for _ in range(5):
        h.tick("a")
        h.stabilize()
    assert h.read_states["a"] == []


def test_single_node_read_is_immediate() -> None:
    h = Harness(["a"])
    h.elect("a")
    h.nodes["a"].read_index(b"solo")
    h.process("a")
    assert h.read_states["a"] == [ReadState(index=1, request_ctx=b"solo")]


def test_reads_are_confirmed_in_order() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.nodes["a"].read_index(b"r1")
    h.nodes["a"].read_index(b"r2")
    h.process("a")
    # Only the heartbeats for r2 (the later round) get through; that quorum confirms r1 too.
    rounds = sorted({m.context for m in h.queue if m.type == HEARTBEAT})
    assert len(rounds) == 2
    h.take(lambda m: m.type == HEARTBEAT and m.context == rounds[0])
    h.stabilize()
    assert [r.request_ctx for r in h.read_states["a"]] == [b"r1", b"r2"]


# -- leadership transfer ---------------------------------------------------------------------


def test_same_context_from_two_nodes_does_not_collide() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.nodes["b"].read_index(b"1")
    h.nodes["c"].read_index(b"1")
    h.process("b")
    h.process("c")
    h.stabilize()
    assert [r.request_ctx for r in h.read_states["b"]] == [b"1"]
    assert [r.request_ctx for r in h.read_states["c"]] == [b"1"]


def test_transfer_to_an_up_to_date_follower() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    h.stabilize()
    h.nodes["a"].transfer_leadership("c")
    h.process("a")
    assert [m.type for m in h.queue] == [MessageType.TIMEOUT_NOW]
    h.stabilize()  # c campaigns at once, overriding b's lease on a
    assert h.leaders() == ["c"]
    assert h.nodes["c"].term == 2
    h.propose("c", b"y")
    h.stabilize()
    for node in h.ids:
        assert h.data_applied(node) == [b"x", b"y"]


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    for k in range(5):
        h.propose("a", b"%d" % k)
    h.stabilize()
    h.heal()
    h.nodes["a"].transfer_leadership("c")
    h.process("a")
    assert not any(m.type == MessageType.TIMEOUT_NOW for m in h.queue)
    with pytest.raises(NotLeader) as info:
        h.nodes["a"].propose(b"during-transfer")
    assert info.value.leader == "c"
    h.stabilize()
    assert h.leaders() == ["c"]
    assert h.data_applied("c") == [b"%d" % k for k in range(5)]


def test_transfer_requested_on_a_follower_is_forwarded() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.nodes["b"].transfer_leadership("b")
    h.process("b")
    h.stabilize()
    assert h.leaders() == ["b"]


def test_transfer_to_an_unreachable_node_is_abandoned() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    h.propose("a", b"x")
    h.stabilize()
    h.nodes["a"].transfer_leadership("c")
    h.process("a")
    with pytest.raises(NotLeader):
        h.nodes["a"].propose(b"y")
    for _ in range(12):  # an election timeout later the leader gives up and serves again
        h.tick("a")
        h.stabilize()
    assert h.nodes["a"].role == Role.LEADER
    assert h.nodes["a"].status.lead_transferee == ""
    h.propose("a", b"y")
    h.stabilize()
    assert h.data_applied("b") == [b"x", b"y"]


def test_transfer_to_self_or_non_member_is_ignored() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.nodes["a"].transfer_leadership("a")
    h.nodes["a"].transfer_leadership("zz")
    h.process("a")
    assert h.nodes["a"].status.lead_transferee == ""
    assert h.queue == []
