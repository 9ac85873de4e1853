"""Log replication: repairing divergent logs, fast backtracking, leader completeness, Figure 8."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from consensus.sim.harness import Harness
from consensus.types import EntryType, Message, MessageType, Role

APPEND = MessageType.APPEND


def test_divergent_follower_logs_are_repaired() -> None:
    """Raft paper Figure 7: followers missing entries, with extra entries, or both."""
    ids = ["lead", "f1", "f2", "f3", "f4", "f5", "f6"]
    h = Harness(ids, pre_vote=False)
    leader_log = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
    h.preset("lead", leader_log, term=6)
    h.preset("f1", [1, 1, 1, 4, 4, 5, 5, 6, 6], term=6)  # missing one
    h.preset("f2", [1, 1, 1, 4], term=4)  # missing many
    h.preset("f3", [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6], term=6)  # one extra
    h.preset("f4", [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7], term=7)  # extra, later term
    h.preset("f5", [1, 1, 1, 4, 4, 4, 4], term=4)  # extra uncommitted term 4
    h.preset("f6", [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], term=3)  # divergent terms 2 and 3
    # The leader needs votes from f1, f2, f5 and f6 (f3 and f4 have more up-to-date logs).
    h.nodes["lead"].term = 7  # as if it had lost an election in term 7 already
    h.elect("lead")
    h.propose("lead", b"after")
    h.stabilize()
    expected = h.log_terms("lead")
    assert [t for _, t in expected[:10]] == leader_log
    for node in ids:
        assert h.log_terms(node) == expected, node
        assert h.nodes[node].log.commit == len(expected)


def test_fast_backtracking_skips_a_whole_term_per_round_trip() -> None:
    h = Harness(["a", "b", "c"], pre_vote=False, max_msg_entries=1000)
    # b holds 50 entries of term 2 that a never had; a has 50 entries of term 3 after index 10.
    h.preset("a", [1] * 10 + [3] * 50, term=3)
    h.preset("b", [1] * 10 + [2] * 50, term=2)
    h.preset("c", [1] * 10 + [3] * 50, term=3)
    h.isolate("c")
    h.elect("a")
    rejections = 0
    appends = 0
    for _ in range(50):
        batch = h.take()
        if not batch:
            break
        appends += sum(1 for m in batch if m.type == APPEND and m.to == "b")
        rejections += sum(1 for m in batch if m.type == MessageType.APPEND_RESP and m.reject)
        h.deliver(batch)
    assert h.log_terms("b") == h.log_terms("a")
    # One-entry-at-a-time backtracking would need ~50 rejections; the term hint needs ~2.
    assert rejections <= 3, rejections
    assert appends <= 5, appends


def test_leader_completeness_only_up_to_date_logs_win() -> None:
    h = Harness(["a", "b", "c", "d", "e"])
    h.elect("a")
    h.isolate("d")
    h.isolate("e")
    for k in range(5):
        h.propose("a", b"v%d" % k)
    h.stabilize()
    assert h.nodes["a"].log.commit == 6  # NOOP + 5 entries on a, b, c
    committed = h.log_terms("a")
    h.crash("a")
    h.heal()
    h.isolate("a")
    for node in ("b", "c", "d", "e"):
        h.tick(node, 10)  # let the leases on a run out
    # d and e (stale logs) cannot win; b or c can, and then holds every committed entry.
    h.campaign("d")
    h.stabilize()
    assert h.nodes["d"].role != Role.LEADER
    h.campaign("e")
    h.stabilize()
    assert h.nodes["e"].role != Role.LEADER
    h.elect("c")
    assert h.log_terms("c")[: len(committed)] == committed
    h.stabilize()
    for node in ("b", "c", "d", "e"):
        assert h.data_applied(node)[:5] == [b"v%d" % k for k in range(5)]


def _keep_term_4_off_s3(h: Harness) -> Callable[[Message], bool]:
    """Deliver everything except an APPEND that would put index 3 into s3's log."""

    def accept(m: Message) -> bool:
        if m.to != "s3" or m.type != APPEND or not any(e.index >= 3 for e in m.entries):
            return True
        return not h.nodes[m.to].log.match_term(m.index, m.log_term)

    return accept


def test_figure_8_previous_term_entries_commit_only_via_current_term() -> None:
    """Raft paper Figure 8 (c)-(d): replication to a majority does not commit an old entry."""
    ids = ["s1", "s2", "s3", "s4", "s5"]
    h = Harness(ids, pre_vote=False, check_quorum=False, max_msg_entries=1)
    # (b) after: s1 led term 2 and put index 2 on s1, s2; s5 led term 3 with index 2 only on s5.
    h.preset("s1", [1, 2], term=3)
    h.preset("s2", [1, 2], term=3)
    h.preset("s3", [1], term=3, vote="s5")
    h.preset("s4", [1], term=3, vote="s5")
    h.preset("s5", [1, 3], term=3, vote="s5")
    # (c) s1 wins term 4 with s2 and s3, and replicates the term-2 entry to s3 as well.
    h.isolate("s4")
    h.isolate("s5")
    h.campaign("s1")
    h.stabilize(accept=_keep_term_4_off_s3(h))
    s1 = h.nodes["s1"]
    assert s1.role == Role.LEADER and s1.term == 4
    assert h.log_terms("s3") == [(1, 1), (2, 2)]
    assert s1.progress["s3"].match >= 2 and s1.progress["s2"].match >= 2
    # Index 2 is on a majority (s1, s2, s3) but it is from term 2: it must not count; index 3
    # (term 4) is only on s1 and s2.
    assert h.log_terms("s2") == [(1, 1), (2, 2), (3, 4)]
    assert s1.log.commit < 2
    assert all(not any(e.index == 2 for e in h.applied[n]) for n in ids)
    # (d) s1 crashes; s5 (last term 3) can win with s3 and s4 and overwrite index 2.
    h.crash("s1")
    h.queue.clear()
    h.heal()
    h.campaign("s5")  # term 4: s3 already voted for s1 in term 4, so this one fails
    h.stabilize()
    h.elect("s5")  # term 5
    h.propose("s5", b"after")
    h.stabilize()
    h.restart("s1")
    h.tick("s5")
    h.stabilize()
    for n in ids:
        entry_2 = [e for e in h.applied[n] if e.index == 2]
        assert entry_2 and entry_2[0].data == b"2/3", n


def test_figure_8_entry_commits_once_a_current_term_entry_does() -> None:
    """Figure 8 (e): once s1's own-term entry is on a majority, index 2 is safe for good."""
    ids = ["s1", "s2", "s3", "s4", "s5"]
    h = Harness(ids, pre_vote=False, check_quorum=False)
    h.preset("s1", [1, 2], term=3)
    h.preset("s2", [1, 2], term=3)
    h.preset("s3", [1], term=3, vote="s5")
    h.preset("s4", [1], term=3, vote="s5")
    h.preset("s5", [1, 3], term=3, vote="s5")
    h.isolate("s4")
    h.isolate("s5")
    h.elect("s1")  # the NOOP of term 4 reaches s2 and s3 and commits, taking index 2 with it
    assert h.nodes["s1"].log.commit == 3
    assert [e.data for e in h.applied["s1"] if e.type == EntryType.NORMAL] == [
        b"1/1",
        b"2/2",
    ]
    h.crash("s1")
    h.heal()
    h.isolate("s1")
    for n in ("s2", "s3", "s4"):
        h.tick(n, 10)
    # s5's log (last term 3) is now behind a majority's (last term 4): it cannot win.
    h.campaign("s5")
    h.stabilize()
    assert h.nodes["s5"].role != Role.LEADER
    h.elect("s2")
    h.stabilize()
    assert next(e for e in h.applied["s5"] if e.index == 2).data == b"2/2"


def test_entries_are_batched_and_pipelined() -> None:
    h = Harness(["a", "b", "c"], max_msg_entries=4, max_inflight=2)
    h.elect("a")
    for k in range(30):
        h.nodes["a"].propose(b"%d" % k)
    h.process("a")
    first_round = [m for m in h.queue if m.type == APPEND and m.to == "b"]
    # Two messages of at most four entries may be in flight to b before it answers.
    assert len(first_round) == 2
    assert all(len(m.entries) <= 4 for m in first_round)
    h.stabilize()
    for node in h.ids:
        assert h.data_applied(node) == [b"%d" % k for k in range(30)]


def test_lost_appends_recover_through_heartbeats() -> None:
    h = Harness(["a", "b", "c"], max_inflight=1)
    h.elect("a")
    h.propose("a", b"x")
    h.take(lambda m: m.type == APPEND)  # every append of x is lost
    for k in range(3):
        h.propose("a", b"y%d" % k)
        h.take(lambda m: m.type == APPEND)
    for _ in range(5):
        h.tick("a")
        h.stabilize()
    for node in h.ids:
        assert h.data_applied(node) == [b"x", b"y0", b"y1", b"y2"]


def test_commit_reaches_followers_via_heartbeat() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.propose("a", b"x")
    # Deliver the entries and the acks, but drop the follow-up appends that carry the commit.
    h.deliver(h.take(lambda m: m.type == APPEND))
    h.deliver(h.take(lambda m: m.type == MessageType.APPEND_RESP))
    h.take(lambda m: m.type == APPEND)
    assert h.data_applied("a") == [b"x"]
    assert h.data_applied("b") == []
    h.tick("a")
    h.stabilize()
    assert h.data_applied("b") == h.data_applied("c") == [b"x"]


def test_a_follower_that_lost_acknowledged_entries_is_repaired_without_a_message_storm() -> None:
    """A disk that loses fsynced writes (the chaos tool's ``flip-byte tail``) leaves a follower
    behind what the leader recorded as its match. The leader must take the follower's word,
    back off and repair it, not probe the same index forever."""
    h = Harness(["a", "b", "c"])
    h.elect("a")
    for k in range(5):
        h.propose("a", b"x%d" % k)
    h.stabilize()
    h.crash("b")
    store = h.stores["b"]
    lost = store.entries.pop()  # acknowledged: the leader counts it in b's match
    commit = min(store.hard_state.commit, lost.index - 1)
    store.hard_state = replace(store.hard_state, commit=commit)
    h.restart("b")
    h.propose("a", b"after")
    appends_to_b = 0
    for _ in range(40):
        batch = h.take()
        if not batch:
            break
        appends_to_b += sum(1 for m in batch if m.type == APPEND and m.to == "b")
        h.deliver(batch)
        h.process_all()
    assert h.log_terms("b") == h.log_terms("a")
    assert h.data_applied("b")[-2:] == [b"x4", b"after"]
    assert appends_to_b <= 6, appends_to_b
