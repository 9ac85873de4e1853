"""Elections: split votes, strict majorities, durable votes, pre-vote, check-quorum, stale leaders.

Each test drives a hand-held cluster (``Harness``): messages move only when the test delivers
them, so every step of the scenario is visible in the test body.
"""

from __future__ import annotations

from consensus.sim.harness import Harness
from consensus.types import MessageType, Role

VOTES = (MessageType.VOTE, MessageType.VOTE_RESP, MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP)


def test_split_vote_then_a_later_election_succeeds() -> None:
    h = Harness(["a", "b", "c", "d"], pre_vote=False)
    # a and b start elections for the same term at the same time; each gets one other vote.
    h.campaign("a")
    h.campaign("b")
    assert h.nodes["a"].term == h.nodes["b"].term == 1
    h.deliver(h.take(lambda m: m.frm == "a" and m.to == "c"))
    h.deliver(h.take(lambda m: m.frm == "b" and m.to == "d"))
    h.stabilize()
    # Neither can reach 3 of 4 votes any more: both concede, and term 1 has no leader.
    assert h.leaders() == []
    assert h.nodes["a"].role == h.nodes["b"].role == Role.FOLLOWER
    assert (h.nodes["c"].vote, h.nodes["d"].vote) == ("a", "b")
    # The next randomized timeout breaks the tie.
    h.elect("c")
    assert h.leaders() == ["c"]
    assert h.nodes["c"].term == 2


def test_four_node_cluster_never_elects_on_two_votes() -> None:
    h = Harness(["a", "b", "c", "d"], pre_vote=False)
    h.cut("a", "c")
    h.cut("a", "d")
    h.campaign("a")
    h.stabilize()
    # a has its own vote and b's: half of four is not a majority.
    assert h.nodes["a"].role == Role.CANDIDATE
    assert h.nodes["b"].vote == "a"
    assert h.leaders() == []
    # With c reachable it gets the third vote.
    h.heal()
    h.cut("a", "d")
    h.elect("a")


def test_four_node_pre_vote_needs_three_grants() -> None:
    h = Harness(["a", "b", "c", "d"])
    h.isolate("c")
    h.isolate("d")
    h.campaign("a")
    h.stabilize()
    assert h.nodes["a"].role == Role.PRE_CANDIDATE
    assert h.nodes["a"].term == 0  # the pre-vote never bumped the term


def test_no_double_vote_after_restart() -> None:
    h = Harness(["a", "b", "c"], pre_vote=False)
    h.cut("a", "c")
    h.campaign("a")
    h.stabilize()  # b votes for a in term 1; a becomes leader
    assert h.nodes["b"].vote == "a"
    assert h.leaders() == ["a"]
    # b crashes and comes back: its vote comes back from the durable hard state.
    h.crash("b")
    restarted = h.restart("b")
    assert (restarted.term, restarted.vote) == (1, "a")
    # c (still at term 0, cut off from a) campaigns for term 1 too: b must refuse.
    h.isolate("a")
    h.nodes["c"].campaign()
    h.process("c")
    assert h.nodes["c"].term == 1
    h.stabilize()
    assert h.nodes["c"].role == Role.CANDIDATE
    leaders_of_term_1 = [n for n in h.ids if h.nodes[n].role == Role.LEADER]
    assert leaders_of_term_1 == ["a"]


def test_vote_is_persisted_before_it_is_sent() -> None:
    h = Harness(["a", "b", "c"], pre_vote=False)
    h.campaign("a")
    # b handles the vote request: the grant leaves in the same Ready as the hard state that
    # records it, and the harness writes the store before it queues messages.
    h.deliver(h.take(lambda m: m.to == "b"))
    assert h.stores["b"].hard_state.vote == "a"
    assert any(m.type == MessageType.VOTE_RESP and not m.reject for m in h.queue)


def test_pre_vote_keeps_a_partitioned_node_from_disrupting_the_term() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    h.stabilize()
    h.isolate("c")
    # Many election timeouts pass on c: it keeps pre-campaigning, never bumping its term.
    for _ in range(10):
        h.tick("c", 20)
        h.take(lambda m: m.frm == "c")
    assert h.nodes["c"].term == 1
    assert h.nodes["c"].role == Role.PRE_CANDIDATE
    # Rejoining changes nothing for the leader.
    h.heal()
    h.tick("c", 20)
    h.stabilize()
    h.tick("a")
    h.stabilize()
    assert h.leaders() == ["a"]
    assert h.nodes["a"].term == 1
    assert h.nodes["c"].status.role == Role.FOLLOWER and h.nodes["c"].lead == "a"


def test_without_pre_vote_a_rejoining_node_does_disrupt() -> None:
    """The contrast case, showing what pre-vote buys."""
    h = Harness(["a", "b", "c"], pre_vote=False, check_quorum=False)
    h.elect("a")
    h.isolate("c")
    for _ in range(3):
        h.tick("c", 20)
        h.take(lambda m: m.frm == "c")
    assert h.nodes["c"].term > 1
    h.heal()
    h.tick("c", 20)
    h.stabilize()
    assert h.nodes["a"].term > 1  # the leader was forced into a new term


def test_followers_in_lease_ignore_vote_requests() -> None:
    h = Harness(["a", "b", "c"], pre_vote=False)
    h.elect("a")
    # c starts a real election while b still hears from a: b ignores it, c cannot win.
    h.campaign("c")
    h.stabilize(accept=lambda m: m.frm != "a" and m.to != "a")
    assert h.nodes["b"].term == 1
    assert h.nodes["c"].role == Role.CANDIDATE


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("a")
    # Within two election timeouts a notices it lost its quorum.
    for _ in range(20):
        h.tick("a")
        h.stabilize()
    assert h.nodes["a"].role == Role.FOLLOWER
    assert h.nodes["a"].lead == ""


def test_leader_with_quorum_stays() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    for _ in range(40):
        h.tick("a")
        h.stabilize()
    assert h.nodes["a"].role == Role.LEADER


def test_stale_leader_rejoins_and_its_uncommitted_entries_are_replaced() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"committed")
    h.stabilize()
    h.isolate("a")
    # a still believes it leads and accepts proposals that can never commit.
    h.propose("a", b"lost-1")
    h.propose("a", b"lost-2")
    h.take(lambda m: m.frm == "a")
    # b and c elect b (their lease on a runs out first).
    h.tick("c", 10)
    h.tick("b", 10)
    h.elect("b")
    h.propose("b", b"new")
    h.stabilize()
    # a rejoins: it learns the new term from the first message and follows b.
    h.heal()
    h.tick("b")
    h.stabilize()
    assert h.nodes["a"].role == Role.FOLLOWER and h.nodes["a"].lead == "b"
    for node in h.ids:
        assert h.data_applied(node) == [b"committed", b"new"]
    assert h.log_terms("a") == h.log_terms("b")


def test_stale_leader_learns_the_new_term_from_a_rejected_heartbeat() -> None:
    h = Harness(["a", "b", "c"], check_quorum=False)
    h.elect("a")
    h.isolate("a")
    h.tick("b", 10)
    h.elect("b")
    h.heal()
    # a's heartbeat carries the old term; the answer carries the new one and deposes a.
    h.tick("a")
    h.stabilize()
    assert h.nodes["a"].role == Role.FOLLOWER
    assert h.nodes["a"].term == h.nodes["b"].term == 2


def test_candidate_with_stale_log_cannot_win() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    h.propose("a", b"x")
    h.stabilize()
    h.heal()
    h.isolate("a")
    # c's log lacks x; b must refuse it even after its lease on a expires.
    h.tick("b", 10)
    h.campaign("c")
    h.stabilize()
    assert h.nodes["c"].role != Role.LEADER
    h.campaign("b")
    h.stabilize()
    assert h.nodes["b"].role == Role.LEADER
