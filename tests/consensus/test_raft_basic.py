"""Smoke-level behaviour of the core: elect, replicate, commit, apply, restart."""

from __future__ import annotations

import random

import pytest

from consensus.quorum import VoteResult, committed_index, quorum, tally
from consensus.raft import RaftConfig, RaftCore
from consensus.sim.harness import Harness
from consensus.types import EntryType, HardState, NotLeader, PersistedState, Role


def test_single_node_elects_itself_and_commits() -> None:
    h = Harness(["a"])
    h.elect("a")
    term, index = h.propose("a", b"x")
    h.stabilize()
    assert (term, index) == (1, 2)  # index 1 is the leader's NOOP
    assert h.data_applied("a") == [b"x"]


def test_three_nodes_elect_and_replicate() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    assert h.leaders() == ["a"]
    assert all(h.nodes[n].lead == "a" for n in h.ids)
    for k in range(20):
        h.propose("a", b"v%d" % k)
    h.stabilize()
    expected = [b"v%d" % k for k in range(20)]
    for node in h.ids:
        assert h.data_applied(node) == expected
    # the NOOP of term 1 is applied first everywhere
    assert all(h.applied[n][0].type == EntryType.NOOP for n in h.ids)


def test_follower_rejects_proposals_with_leader_hint() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    with pytest.raises(NotLeader) as info:
        h.nodes["b"].propose(b"x")
    assert info.value.leader == "a"


def test_ticks_alone_elect_a_leader() -> None:
    h = Harness(["a", "b", "c"], seed=3)
    for _ in range(100):
        h.tick_all()
        h.stabilize()
        if h.leaders():
            break
    assert len(h.leaders()) == 1


def test_restart_keeps_term_vote_and_log() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    h.stabilize()
    before = h.nodes["b"].status
    h.crash("b")
    core = h.restart("b")
    assert core.term == before.term
    assert core.vote == "a"
    assert core.log.last_index == before.last_index
    assert core.log.commit == before.commit
    h.stabilize()
    assert h.data_applied("b") == [b"x"]  # re-applied from the log after restart


def test_core_uses_only_the_given_rng() -> None:
    cfg = RaftConfig(id="a", peers=("a", "b", "c"))
    st = PersistedState(hard_state=HardState(term=5, vote="b", commit=0))
    one = RaftCore(cfg, random.Random(7), st)
    two = RaftCore(cfg, random.Random(7), st)
    for _ in range(40):
        one.tick()
        two.tick()
    assert one.ready() == two.ready()
    assert one.role == two.role == Role.PRE_CANDIDATE


def test_quorum_is_a_strict_majority() -> None:
    assert [quorum(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    voters = ("a", "b", "c", "d")
    assert tally(voters, {"a": True, "b": True}) == VoteResult.PENDING
    assert tally(voters, {"a": True, "b": True, "c": True}) == VoteResult.WON
    assert tally(voters, {"a": True, "b": False, "c": False}) == VoteResult.LOST
    # votes from non-voters do not count
    assert tally(voters, {"a": True, "b": True, "x": True, "y": True}) == VoteResult.PENDING
    assert committed_index(voters, {"a": 9, "b": 7, "c": 5, "d": 1}) == 5  # held by a, b and c
