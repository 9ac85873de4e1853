"""Log compaction and snapshot installation."""

from __future__ import annotations

import pytest

from consensus.sim.harness import Harness
from consensus.types import Message, MessageType, Role, Snapshot, SnapshotMeta

SNAPSHOT = MessageType.SNAPSHOT


def compact(h: Harness, node: str, data: bytes = b"state") -> Snapshot:
    """What an application does: snapshot at its applied index, save it, then compact."""
    core = h.nodes[node]
    snap = Snapshot(core.snapshot_meta(core.log.applied), data)
    h.stores[node].compact(snap)
    core.compact(snap)
    return snap


def test_compaction_drops_the_prefix_and_keeps_the_boundary_term() -> None:
    h = Harness(["a"])
    h.elect("a")
    for k in range(10):
        h.propose("a", b"%d" % k)
    h.stabilize()
    core = h.nodes["a"]
    snap = compact(h, "a")
    assert snap.meta.index == 11 and snap.meta.term == 1
    assert snap.meta.conf.voters == ("a",)
    assert core.log.first_index == 12
    assert core.log.term(11) == 1
    assert core.log.term(5) is None
    # Compacting again at or below the snapshot is a no-op.
    core.compact(Snapshot(SnapshotMeta(index=3, term=1)))
    assert core.log.first_index == 12


def test_compaction_past_the_applied_index_is_refused() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("b")
    h.isolate("c")
    h.propose("a", b"x")  # appended, never committed
    core = h.nodes["a"]
    with pytest.raises(ValueError):
        core.compact(Snapshot(SnapshotMeta(index=core.log.last_index, term=1)))
    with pytest.raises(ValueError):
        core.compact(Snapshot(SnapshotMeta(index=1, term=7)))  # wrong term for index 1


def test_lagging_follower_gets_the_snapshot_then_the_rest() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    for k in range(20):
        h.propose("a", b"%d" % k)
    h.stabilize()
    snap = compact(h, "a", data=b"image-at-21")
    h.propose("a", b"after-snapshot")
    h.stabilize()
    h.heal()
    h.tick("a")
    sent = []
    for _ in range(50):
        batch = h.take()
        if not batch:
            break
        sent += [m for m in batch if m.type == SNAPSHOT]
        h.deliver(batch)
    assert len(sent) == 1 and sent[0].snapshot == snap
    c = h.nodes["c"]
    assert h.snapshots_applied["c"] == [snap]
    assert c.log.first_index == snap.meta.index + 1
    assert h.data_applied("c") == [b"after-snapshot"]
    assert c.log.commit == h.nodes["a"].log.commit
    assert h.nodes["a"].status.progress["c"].match == c.log.last_index


def test_follower_restarts_from_its_snapshot() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    for k in range(5):
        h.propose("a", b"%d" % k)
    h.stabilize()
    compact(h, "b")
    h.propose("a", b"tail")
    h.stabilize()
    h.crash("b")
    b = h.restart("b")
    assert b.log.first_index == 7
    assert b.log.applied == 6  # the snapshot index: the application restores its image
    h.stabilize()
    assert h.data_applied("b") == [b"tail"]  # only entries after the snapshot are re-applied


def test_lost_snapshot_is_sent_again() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    h.isolate("c")
    for k in range(5):
        h.propose("a", b"%d" % k)
    h.stabilize()
    compact(h, "a")
    h.heal()
    h.tick("a")
    h.stabilize(accept=lambda m: m.type != SNAPSHOT)
    lost = h.take(lambda m: m.type == SNAPSHOT)
    assert len(lost) == 1
    # The leader waits for the snapshot, then gives up on it and probes again.
    for _ in range(30):
        h.tick("a")
        h.stabilize()
    assert h.nodes["c"].log.commit == h.nodes["a"].log.commit
    assert h.nodes["a"].role == Role.LEADER


def test_snapshot_the_follower_already_covers_only_advances_commit() -> None:
    h = Harness(["a", "b", "c"])
    h.elect("a")
    for k in range(5):
        h.propose("a", b"%d" % k)
    h.deliver(h.take(lambda m: m.type == MessageType.APPEND))  # b, c append, commit unknown
    h.take()
    c = h.nodes["c"]
    assert c.log.last_index == 6 and c.log.commit == 1
    snap = Snapshot(SnapshotMeta(index=4, term=1, conf=c.conf), b"img")
    c.step(Message(SNAPSHOT, to="c", frm="a", term=1, snapshot=snap))
    h.process("c")
    assert c.log.commit == 4
    assert c.log.first_index == 1  # nothing was thrown away
    assert h.snapshots_applied["c"] == []
