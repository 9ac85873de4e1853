"""The core never raises on arbitrary messages and keeps its basic invariants (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.confchange import encode_conf_change
from consensus.raft import RaftCore
from consensus.sim.harness import Harness
from consensus.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Role,
    Snapshot,
    SnapshotMeta,
)

IDS = ["a", "b", "c"]
small = st.integers(min_value=0, max_value=12)
index = st.integers(min_value=0, max_value=40)
node_ids = st.sampled_from([*IDS, "zz", ""])

conf_data = st.builds(
    lambda t, n, v: encode_conf_change(ConfChange(t, n), ConfState(voters=v)),
    st.sampled_from(ConfChangeType),
    st.sampled_from(IDS),
    st.sampled_from([("a", "b"), ("a", "b", "c", "d"), ("b",)]),
)
entries = st.builds(
    Entry,
    term=small,
    index=index,
    type=st.sampled_from(EntryType),
    data=st.one_of(st.binary(max_size=8), conf_data),
)
snapshots = st.builds(
    Snapshot,
    meta=st.builds(
        SnapshotMeta,
        index=index,
        term=small,
        conf=st.builds(
            ConfState,
            voters=st.sampled_from([(), ("a",), ("a", "b", "c"), ("x", "")]),
            learners=st.sampled_from([(), ("l",)]),
        ),
    ),
    data=st.binary(max_size=8),
)


@st.composite
def contiguous_entries(draw: st.DrawFn, start: int, max_term: int) -> tuple[Entry, ...]:
    """Well-formed APPEND payloads, so fuzzing reaches the deep paths and not just validation."""
    n = draw(st.integers(min_value=0, max_value=5))
    terms = sorted(draw(st.lists(st.integers(1, max(1, max_term)), min_size=n, max_size=n)))
    return tuple(Entry(t, start + 1 + i, EntryType.NORMAL, b"f") for i, t in enumerate(terms))


@st.composite
def messages(draw: st.DrawFn, to: str) -> Message:
    kind = draw(st.sampled_from(MessageType))
    term = draw(small)
    idx = draw(index)
    log_term = draw(small)
    if kind == MessageType.APPEND and draw(st.booleans()):
        ents = draw(contiguous_entries(idx, term))
        log_term = min(log_term, term)
    else:
        ents = tuple(draw(st.lists(entries, max_size=4)))
    return Message(
        type=kind,
        to=to if draw(st.integers(0, 9)) else draw(node_ids),
        frm=draw(node_ids),
        term=term,
        log_term=log_term,
        index=idx,
        entries=ents,
        commit=draw(index),
        reject=draw(st.booleans()),
        reject_hint=draw(index),
        snapshot=draw(st.one_of(st.none(), snapshots)),
        context=draw(st.binary(max_size=6)),
    )


def _check_invariants(core: RaftCore) -> None:
    log = core.log
    assert log.snapshot_index <= log.applied <= log.commit <= log.last_index
    assert core.role != Role.LEADER or core.lead == core.id
    status = core.status
    assert status.term == core.term


def _build(state: str) -> tuple[Harness, RaftCore]:
    h = Harness(IDS)
    if state == "leader":
        h.elect("a")
        h.propose("a", b"x")
        h.stabilize()
    elif state == "follower":
        h.elect("b")
        h.propose("b", b"x")
        h.stabilize()
    elif state == "candidate":
        h.nodes["a"].campaign()
    return h, h.nodes["a"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.sampled_from(["fresh", "leader", "follower", "candidate"]),
    msgs=st.lists(messages("a"), max_size=25),
    ticks=st.lists(st.integers(0, 3), max_size=25),
)
def test_core_never_raises_on_arbitrary_messages(
    state: str, msgs: list[Message], ticks: list[int]
) -> None:
    _, core = _build(state)
    term = core.term
    for i, m in enumerate(msgs):
        core.step(m)
        for _ in range(ticks[i] if i < len(ticks) else 0):
            core.tick()
        assert core.term >= term  # terms never go backwards
        term = core.term
        if core.has_ready():
            rd = core.ready()
            core.advance(rd)
        _check_invariants(core)


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(messages("a"), max_size=15))
def test_client_calls_after_garbage_still_work_or_raise_cleanly(msgs: list[Message]) -> None:
    _, core = _build("leader")
    for m in msgs:
        core.step(m)
    if core.role == Role.LEADER and not core.status.lead_transferee:
        term, idx = core.propose(b"ok")
        assert (term, idx) == (core.term, core.log.last_index)
    core.read_index(b"r")
    core.transfer_leadership("b")
    for _ in range(30):
        if not core.has_ready():
            break
        core.advance(core.ready())
    _check_invariants(core)
