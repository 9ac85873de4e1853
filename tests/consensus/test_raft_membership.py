"""Single-server membership changes: add, remove (including the leader), learners, faults."""

from __future__ import annotations

import pytest

from consensus.confchange import decode_conf_change, encode_conf_change
from consensus.raft import ConfChangeRejected
from consensus.sim.harness import Harness
from consensus.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    MessageType,
    NotLeader,
    Role,
)

ADD = ConfChangeType.ADD_NODE
REMOVE = ConfChangeType.REMOVE_NODE
LEARNER = ConfChangeType.ADD_LEARNER


def change(h: Harness, leader: str, kind: ConfChangeType, node: str) -> int:
    _, index = h.nodes[leader].propose_conf_change(ConfChange(kind, node))
    h.process(leader)
    return index


def test_add_a_node_which_then_counts_towards_quorum() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.add_node("d")  # joins with no idea of the membership
    assert h.nodes["d"].conf == ConfState()
    change(h, "a", ADD, "d")
    # Append-time semantics: the leader uses the new membership before the entry commits.
    assert h.nodes["a"].conf.voters == ("a", "b", "c", "d")
    h.stabilize()
    for node in "abcd":
        assert h.nodes[node].conf.voters == ("a", "b", "c", "d")
    assert h.data_applied("d") == []  # it got the log from index 1, nothing but NOOP/conf
    # Four voters need three acks: with b and c gone, a and d cannot commit.
    h.isolate("b")
    h.isolate("c")
    h.propose("a", b"x")
    h.stabilize()
    assert h.data_applied("a") == []
    h.heal()
    h.isolate("c")
    h.tick("a")
    h.stabilize()
    assert h.data_applied("a") == h.data_applied("d") == [b"x"]


def test_remove_a_follower() -> None:
    h = Harness(["a", "b", "c", "d"])
    h.elect("a")
    change(h, "a", REMOVE, "d")
    h.stabilize()
    for node in "abc":
        assert h.nodes[node].conf.voters == ("a", "b", "c")
    # The leader stops replicating to d as soon as it appends the removal, so d may never
    # hear of it (the operator shuts it down). Its pre-votes cannot disturb anyone.
    assert "d" not in h.nodes["a"].progress
    h.tick("d", 50)
    h.stabilize()
    assert h.nodes["d"].term == 1 and h.leaders() == ["a"]
    # Three voters need two acks.
    h.isolate("c")
    h.propose("a", b"x")
    h.stabilize()
    assert h.data_applied("a") == [b"x"]


def test_removed_leader_steps_down_and_hands_over() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    index = change(h, "a", REMOVE, "a")
    # Until the removal commits, a keeps leading without counting itself.
    assert h.nodes["a"].role == Role.LEADER
    assert h.nodes["a"].conf.voters == ("b", "c")
    h.stabilize()
    assert h.nodes["a"].status.role == Role.FOLLOWER
    new_leaders = [n for n in "bc" if h.nodes[n].role == Role.LEADER]
    assert len(new_leaders) == 1  # TIMEOUT_NOW handed leadership to a caught-up voter
    leader = new_leaders[0]
    assert h.nodes[leader].log.commit >= index
    h.propose(leader, b"after")
    h.stabilize()
    assert h.data_applied("b") == h.data_applied("c") == [b"after"]
    # a never campaigns again.
    h.tick("a", 50)
    h.stabilize()
    assert h.nodes["a"].status.role == Role.FOLLOWER
    assert h.leaders() == [leader]


def test_only_one_change_at_a_time() -> None:
    h = Harness(["a", "b", "c"])
    h.campaign("a")
    h.deliver(h.take(lambda m: m.type == MessageType.VOTE_RESP or m.type != MessageType.APPEND))
    h.stabilize(accept=lambda m: m.type != MessageType.APPEND)
    assert h.nodes["a"].role == Role.LEADER
    # The NOOP of a's term has not committed: no change may start yet.
    with pytest.raises(ConfChangeRejected):
        h.nodes["a"].propose_conf_change(ConfChange(ADD, "d"))
    h.stabilize()
    change(h, "a", ADD, "d")
    with pytest.raises(ConfChangeRejected):
        h.nodes["a"].propose_conf_change(ConfChange(ADD, "e"))
    with pytest.raises(NotLeader):
        h.nodes["b"].propose_conf_change(ConfChange(ADD, "e"))
    h.add_node("d")
    h.stabilize()
    change(h, "a", ADD, "e")  # the first one committed: now it is fine


def test_nonsensical_changes_are_refused() -> None:
    h = Harness(["a"])
    h.elect("a")
    with pytest.raises(ConfChangeRejected):
        h.nodes["a"].propose_conf_change(ConfChange(ADD, "a"))
    with pytest.raises(ConfChangeRejected):
        h.nodes["a"].propose_conf_change(ConfChange(REMOVE, "zz"))
    with pytest.raises(ConfChangeRejected):
        h.nodes["a"].propose_conf_change(ConfChange(REMOVE, "a"))  # the last voter


def test_membership_change_while_a_node_is_down() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"before")
    h.stabilize()
    h.crash("c")
    h.add_node("d")
    change(h, "a", ADD, "d")
    h.stabilize()
    # a, b and d are three of four voters: the change commits without c.
    assert h.nodes["a"].log.commit == h.nodes["a"].log.last_index
    h.propose("a", b"during")
    h.stabilize()
    assert h.data_applied("d") == [b"before", b"during"]
    # c comes back with the old membership and learns the new one from the log.
    h.restart("c")
    assert h.nodes["c"].conf.voters == ("a", "b", "c")
    h.tick("a")
    h.stabilize()
    assert h.nodes["c"].status.conf.voters == ("a", "b", "c", "d")
    assert h.data_applied("c") == [b"before", b"during"]


def test_uncommitted_change_is_rolled_back_with_the_log() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("a")
    change(h, "a", REMOVE, "c")
    h.take(lambda m: m.frm == "a")
    assert h.nodes["a"].conf.voters == ("a", "b")
    # b and c move on without a; when a rejoins, its uncommitted change is overwritten.
    h.heal()
    h.isolate("a")
    h.tick("b", 10)
    h.tick("c", 10)
    h.elect("b")
    h.heal()
    h.tick("b")
    h.stabilize()
    assert h.nodes["a"].role == Role.FOLLOWER
    assert h.nodes["a"].status.conf.voters == ("a", "b", "c")


def test_learner_replicates_but_never_votes_or_counts() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.add_node("l")
    change(h, "a", LEARNER, "l")
    h.stabilize()
    assert h.nodes["l"].conf.learners == ("l",)
    h.propose("a", b"x")
    h.stabilize()
    assert h.data_applied("l") == [b"x"]
    # A learner does not campaign.
    h.tick("l", 50)
    assert h.nodes["l"].role == Role.FOLLOWER
    # With b and c gone, a and the learner are not a quorum.
    h.isolate("b")
    h.isolate("c")
    h.propose("a", b"y")
    h.stabilize()
    assert h.data_applied("a") == [b"x"]
    # Promote it: now it counts.
    h.heal()
    h.tick("a")
    h.stabilize()
    change(h, "a", ADD, "l")
    h.stabilize()
    assert h.nodes["a"].conf == ConfState(voters=("a", "b", "c", "l"))


def test_removed_node_that_missed_its_removal_cannot_disrupt() -> None:
    h = Harness(["a", "b", "c", "d"])
    h.elect("a")
    h.isolate("d")
    change(h, "a", REMOVE, "d")
    h.stabilize()
    assert h.nodes["d"].conf.voters == ("a", "b", "c", "d")  # it never heard
    h.heal()
    h.cut("a", "d")  # the leader no longer talks to d (it is not a member)
    for _ in range(5):
        h.tick("d", 20)
        h.stabilize()
    # d's pre-votes fail (its log is behind), so nobody's term moved.
    assert h.leaders() == ["a"]
    assert h.nodes["a"].term == 1


def test_conf_change_entry_encoding_round_trip_and_garbage() -> None:
    cc = ConfChange(ADD, "n7")
    conf = ConfState(voters=("n1", "n7"), learners=("n9",))
    assert decode_conf_change(encode_conf_change(cc, conf)) == (cc, conf)
    for junk in (
        b"",
        b"\xff",
        b"[]",
        b'{"type": 9, "node": "x", "voters": ["a"], "learners": []}',
        b'{"type": 0, "node": "x", "voters": [], "learners": []}',
    ):
        assert decode_conf_change(junk) is None


def test_garbage_conf_change_entry_leaves_membership_alone() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    core = h.nodes["a"]
    index = core.log.last_index + 1
    core._append_to_log([Entry(core.term, index, EntryType.CONF_CHANGE, b"not json")])
    assert core.conf.voters == ("a", "b", "c")
