"""Durable log: replay, conflicting appends, torn tails, corruption, snapshots, compaction."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.segments import HEADER_SIZE
from consensus.storage import CorruptLogError, CorruptSnapshotError, DurableLog, StorageError
from consensus.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Ready,
    Snapshot,
    SnapshotMeta,
)


def entries(first: int, last: int, term: int = 1, size: int = 10) -> list[Entry]:
    return [
        Entry(term, i, EntryType.NORMAL, bytes([i % 256]) * size) for i in range(first, last + 1)
    ]


def reopen(path: Path, **kw: int) -> DurableLog:
    return DurableLog.open(path, **kw)  # type: ignore[arg-type]


def record_offsets(path: Path) -> list[int]:
    """Offsets of every record in a segment (walking the length fields)."""
    buf = path.read_bytes()
    offs, off = [], 0
    while off < len(buf):
        offs.append(off)
        off += HEADER_SIZE + int.from_bytes(buf[off : off + 4], "little")
    return offs


def test_fresh_log_is_empty(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        st_ = log.initial_state
        assert st_.entries == () and st_.hard_state == HardState() and st_.snapshot.is_empty


def test_round_trip_entries_and_hard_state(tmp_path: Path) -> None:
    es = [*entries(1, 50), Entry(2, 51, EntryType.NOOP), Entry(2, 52, EntryType.CONF_CHANGE, b"c")]
    with DurableLog.open(tmp_path) as log:
        log.append(es[:20], HardState(1, "a", 0))
        log.persist(Ready(entries=tuple(es[20:]), hard_state=HardState(2, "b", 40)))
        assert log.fsyncs >= 2
    with DurableLog.open(tmp_path) as log:
        assert log.initial_state.entries == tuple(es)
        assert log.initial_state.hard_state == HardState(2, "b", 40)
        assert log.last_index == 52


def test_conflicting_append_truncates_suffix(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 10, term=1))
        log.append(entries(6, 8, term=2))  # new leader overwrote 6..10 with 6..8
        assert log.last_index == 8
    with DurableLog.open(tmp_path) as log:
        got = log.initial_state.entries
        assert [e.index for e in got] == list(range(1, 9))
        assert [e.term for e in got] == [1] * 5 + [2] * 3
        log.append(entries(9, 9, term=3))
    with DurableLog.open(tmp_path) as log:
        assert [e.term for e in log.initial_state.entries] == [1] * 5 + [2] * 3 + [3]


def test_torn_tail_truncated_at_every_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "base"
    with DurableLog.open(base) as log:
        log.append(entries(1, 5), HardState(1, "a", 3))
        log.append(entries(6, 6, size=100))
    seg = base / "wal-0000000000000001.log"
    full = seg.read_bytes()
    last = record_offsets(seg)[-1]
    for cut in (last + 1, last + HEADER_SIZE - 1, last + HEADER_SIZE + 1, len(full) - 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(full[:cut])
        with caplog.at_level(logging.WARNING, logger="consensus.storage"):
            caplog.clear()
            with DurableLog.open(d) as log:
                assert [e.index for e in log.initial_state.entries] == [1, 2, 3, 4, 5]
                assert log.initial_state.hard_state == HardState(1, "a", 3)
                log.append(entries(6, 7, term=2))
        assert f"torn tail in {d / seg.name} at offset {last}" in caplog.text
        with DurableLog.open(d) as log:  # the repaired log appends and replays cleanly
            assert [e.term for e in log.initial_state.entries] == [1] * 5 + [2, 2]


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 3))
    seg = tmp_path / "wal-0000000000000001.log"
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\0" * (4 << 20))  # a file system that extended the file but never wrote the data
    with DurableLog.open(tmp_path) as log:
        assert len(log.initial_state.entries) == 3
    assert seg.stat().st_size == size


@pytest.mark.parametrize("where", ["header", "payload"])
def test_flipped_byte_mid_log_refuses_with_offset(tmp_path: Path, where: str) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 10))
    seg = tmp_path / "wal-0000000000000001.log"
    offs = record_offsets(seg)
    victim = offs[4]
    buf = bytearray(seg.read_bytes())
    buf[victim + (1 if where == "header" else HEADER_SIZE + 5)] ^= 0x40
    seg.write_bytes(bytes(buf))
    with pytest.raises(CorruptLogError) as info:
        DurableLog.open(tmp_path)
    assert info.value.path == seg and info.value.offset == victim
    assert str(victim) in str(info.value)
    assert seg.read_bytes() == bytes(buf)  # refusing touches nothing


def test_flipped_byte_in_last_record_is_torn_tail(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 10))
    seg = tmp_path / "wal-0000000000000001.log"
    last = record_offsets(seg)[-1]
    buf = bytearray(seg.read_bytes())
    buf[-3] ^= 0x01
    seg.write_bytes(bytes(buf))
    with DurableLog.open(tmp_path) as log:
        assert [e.index for e in log.initial_state.entries] == list(range(1, 10))
    assert seg.stat().st_size == last


def test_damage_before_a_later_segment_refuses(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path, segment_bytes=300) as log:
        for i in range(1, 21):
            log.append(entries(i, i))
        paths = log.segment_paths
    assert len(paths) > 2
    first = paths[0]
    first.write_bytes(first.read_bytes()[:-2])  # torn end of a segment that is not the last
    with pytest.raises(CorruptLogError) as info:
        DurableLog.open(tmp_path)
    assert info.value.path == first


def test_hard_state_update_is_atomic(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 3), HardState(1, "a", 1))
        log.append(hard_state=HardState(2, "node-b", 3))
    seg = tmp_path / "wal-0000000000000001.log"
    full = seg.read_bytes()
    last = record_offsets(seg)[-1]
    for cut in range(last + 1, len(full)):  # a crash at any byte of the new hard state record
        seg.write_bytes(full[:cut])
        with DurableLog.open(tmp_path) as log:
            assert log.initial_state.hard_state == HardState(1, "a", 1)
    seg.write_bytes(full)
    with DurableLog.open(tmp_path) as log:
        assert log.initial_state.hard_state == HardState(2, "node-b", 3)


def test_compaction_and_snapshot_round_trip(tmp_path: Path) -> None:
    conf = ConfState(voters=("a", "b", "c"))
    with DurableLog.open(tmp_path, segment_bytes=400) as log:
        for i in range(1, 101):
            log.append(entries(i, i, term=1 + i // 50), HardState(1 + i // 50, "a", i - 1))
        before = list(log.segment_paths)
        snap = Snapshot(SnapshotMeta(index=60, term=2, conf=conf), b"image@60")
        log.compact(snap)
        after = log.segment_paths
    assert len(after) < len(before) and not any(p.exists() for p in before if p not in after)
    with DurableLog.open(tmp_path) as log:
        state = log.initial_state
        assert state.snapshot == snap
        assert [e.index for e in state.entries] == list(range(61, 101))
        assert state.hard_state == HardState(3, "a", 99)
        newer = Snapshot(SnapshotMeta(index=90, term=2, conf=conf), b"image@90")
        log.compact(newer)
    assert sorted(p.name for p in tmp_path.glob("*.snap")) == [
        "snap-00000000000000000090-00000000000000000002.snap"
    ]
    with DurableLog.open(tmp_path) as log:
        assert log.initial_state.snapshot.data == b"image@90"
        assert [e.index for e in log.initial_state.entries] == list(range(91, 101))


def test_snapshot_from_leader_replaces_log(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 20, term=1))  # 11..20 are stale: the leader never committed them
        snap = Snapshot(SnapshotMeta(index=15, term=3, conf=ConfState(("a",))), b"img")
        log.persist(Ready(snapshot=snap, hard_state=HardState(3, "", 15)))
        assert log.last_index == 15
    with DurableLog.open(tmp_path) as log:
        assert log.initial_state.snapshot == snap and log.initial_state.entries == ()
        log.append(entries(16, 17, term=3))
    with DurableLog.open(tmp_path) as log:
        assert [(e.index, e.term) for e in log.initial_state.entries] == [(16, 3), (17, 3)]


def test_corrupt_snapshot_refuses(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 5))
        log.compact(Snapshot(SnapshotMeta(index=4, term=1), b"x" * 100))
    (path,) = tmp_path.glob("*.snap")
    buf = bytearray(path.read_bytes())
    buf[-10] ^= 1
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptSnapshotError):
        DurableLog.open(tmp_path)


def test_missing_entries_after_snapshot_refuse(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path, segment_bytes=200) as log:
        for i in range(1, 30):
            log.append(entries(i, i))
        log.compact(Snapshot(SnapshotMeta(index=20, term=1), b""))
    for p in tmp_path.glob("*.snap"):
        p.unlink()  # the snapshot vanished: the remaining log does not start at 1
    with pytest.raises(StorageError):
        DurableLog.open(tmp_path)


def test_no_fsync_mode_still_round_trips(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path, fsync=False) as log:
        log.append(entries(1, 100), HardState(1, "a", 100))
        assert log.fsyncs == 0
    with DurableLog.open(tmp_path) as log:
        assert len(log.initial_state.entries) == 100


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = DurableLog.open(tmp_path)
    log.close()
    with pytest.raises(StorageError):
        log.append(entries(1, 1))


ops = st.lists(
    st.tuples(st.integers(0, 6), st.integers(1, 4), st.booleans()), min_size=1, max_size=25
)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_random_appends_match_model(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[int, int, bool]]
) -> None:
    """Appends that may overwrite any uncommitted suffix replay to the same log as a list model."""
    d = tmp_path_factory.mktemp("model")
    model: list[Entry] = []
    term = 1
    with DurableLog.open(d, segment_bytes=256) as log:
        for back, count, bump in plan:
            term += bump
            first = max(1, len(model) + 1 - back)
            new = entries(first, first + count - 1, term=term, size=3)
            del model[first - 1 :]
            model.extend(new)
            log.append(new, HardState(term, "", 0))
    with DurableLog.open(d) as log:
        assert list(log.initial_state.entries) == model
        assert log.initial_state.hard_state.term == term
    os.sync()


def test_commit_only_hard_state_can_skip_fsync(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path) as log:
        log.append(entries(1, 3), HardState(1, "a", 0))
        synced = log.fsyncs
        log.append(hard_state=HardState(1, "a", 3), sync=False)
        assert log.fsyncs == synced  # written, but no fsync of its own
    with DurableLog.open(tmp_path) as log:
        assert log.initial_state.hard_state == HardState(1, "a", 3)
