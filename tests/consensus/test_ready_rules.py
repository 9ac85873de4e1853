"""What must be durable before a message leaves is decided once, by the core, for every driver."""

from __future__ import annotations

import random

from consensus.raft import RaftConfig, RaftCore
from consensus.types import Entry, EntryType, Message, MessageType, PersistedState, Ready


def core(name: str) -> RaftCore:
    config = RaftConfig(id=name, peers=("a", "b", "c"), pre_vote=False)
    return RaftCore(config, random.Random(1), PersistedState())


def step_ready(node: RaftCore) -> Ready:
    rd = node.ready()
    node.advance(rd)
    return rd


def test_a_leader_sends_first_only_once_it_led_before_this_ready() -> None:
    a = core("a")
    a.campaign()
    campaign = step_ready(a)
    assert campaign.must_sync and not campaign.send_first  # new term, vote for itself
    term = a.term
    a.step(Message(MessageType.VOTE_RESP, to="a", frm="b", term=term))
    elected = step_ready(a)
    # Just elected: its first entry goes to disk before the appends go out.
    assert elected.entries and elected.must_sync and not elected.send_first
    a.propose(b"x")
    later = step_ready(a)
    assert later.entries and later.must_sync and later.send_first


def test_a_follower_syncs_entries_and_votes_but_not_a_commit_index_alone() -> None:
    b = core("b")
    b.step(Message(MessageType.VOTE, to="b", frm="a", term=2, log_term=0, index=0))
    voted = step_ready(b)
    assert voted.must_sync and not voted.send_first and voted.messages
    append = Message(
        MessageType.APPEND, to="b", frm="a", term=2, log_term=0, index=0,
        entries=(Entry(2, 1),), commit=0,
    )  # fmt: skip
    b.step(append)
    appended = step_ready(b)
    assert appended.entries and appended.must_sync
    b.step(Message(MessageType.HEARTBEAT, to="b", frm="a", term=2, commit=1))
    committed = step_ready(b)
    assert committed.hard_state is not None and committed.hard_state.commit == 1
    assert committed.has_writes and not committed.must_sync and not committed.send_first


def test_the_leader_takes_forwarded_proposals_from_voters_only() -> None:
    a = core("a")
    a.campaign()
    step_ready(a)
    a.step(Message(MessageType.VOTE_RESP, to="a", frm="b", term=a.term))
    step_ready(a)
    last = a.log.last_index
    command = (Entry(0, 0, EntryType.NORMAL, b"cmd"),)
    for outsider in ("x", "joining"):  # not in the membership: dropped, nothing appended
        a.step(Message(MessageType.PROPOSE, to="a", frm=outsider, entries=command))
        assert a.log.last_index == last
    a.step(Message(MessageType.PROPOSE, to="a", frm="c", entries=command))  # a voter
    assert a.log.last_index == last + 1
