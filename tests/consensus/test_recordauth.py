"""An authenticated Raft log, attacked as a hostile host would: it edits records and fixes their
checksums, reorders them, drops or swaps segments, brings another node's log or a snapshot of
its own making. Each is refused at open with what was wrong; a cut tail is the documented
limit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.disk import LocalDisk
from consensus.recordauth import TAG_SIZE
from consensus.segments import encode_record, read_records
from consensus.snapstore import CorruptSnapshotError, SnapshotStore
from consensus.storage import DurableLog, StorageError, TamperedLogError
from consensus.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta


class Mac:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def tag(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self.key, digest_size=TAG_SIZE).digest()


MINE, THEIRS = Mac(b"k" * 32), Mac(b"x" * 32)


def write(path: Path, count: int = 6, auth: Mac = MINE, segment_bytes: int = 1 << 20) -> None:
    with DurableLog.open(path, fsync=False, auth=auth, segment_bytes=segment_bytes) as log:
        for i in range(1, count + 1):
            log.append([Entry(1, i, data=f"cmd{i}".encode())], HardState(term=1, commit=i))


def entries(path: Path, auth: Mac | None = MINE) -> list[bytes]:
    with DurableLog.open(path, fsync=False, auth=auth) as log:
        return [e.data for e in log.initial_state.entries]


def segment(path: Path) -> Path:
    return sorted(path.glob("wal-*.log"))[0]


def rewrite(path: Path, change: object) -> None:
    """Rewrite the first segment record by record with fresh checksums (what an attacker
    without the key can do): ``change`` maps the list of framed payloads to a new list."""
    seg = segment(path)
    records, damage = read_records(seg.read_bytes())
    assert damage is None
    payloads = change([p for _, p in records])  # type: ignore[operator]
    seg.write_bytes(b"".join(encode_record(p) for p in payloads))


def test_an_authenticated_log_reads_back(tmp_path: Path) -> None:
    write(tmp_path)
    assert entries(tmp_path) == [f"cmd{i}".encode() for i in range(1, 7)]
    with DurableLog.open(tmp_path, fsync=False, auth=MINE) as log:  # and appends after a restart
        log.append([Entry(1, 7, data=b"cmd7")])
    assert entries(tmp_path)[-1] == b"cmd7"


def test_a_changed_record_with_a_fixed_checksum_is_refused(tmp_path: Path) -> None:
    write(tmp_path)

    def change(payloads: list[bytes]) -> list[bytes]:
        return [p.replace(b"cmd3", b"CMD3") for p in payloads]

    rewrite(tmp_path, change)
    with pytest.raises(TamperedLogError, match="tag does not verify"):
        entries(tmp_path)


def test_reordered_or_removed_records_are_refused(tmp_path: Path) -> None:
    write(tmp_path)
    rewrite(tmp_path, lambda p: [p[0], p[1], p[3], p[2], *p[4:]])
    with pytest.raises(TamperedLogError):
        entries(tmp_path)
    write(tmp_path / "b")
    rewrite(tmp_path / "b", lambda p: [*p[:3], *p[4:]])
    with pytest.raises(TamperedLogError):
        entries(tmp_path / "b")


def test_another_nodes_log_is_refused(tmp_path: Path) -> None:
    write(tmp_path, auth=THEIRS)
    with pytest.raises(TamperedLogError, match="tag does not verify"):
        entries(tmp_path)


def test_a_log_written_without_a_key_is_refused_by_a_node_with_one(tmp_path: Path) -> None:
    with DurableLog.open(tmp_path, fsync=False) as log:
        log.append([Entry(1, 1, data=b"cmd1")], HardState(term=1))
    with pytest.raises(TamperedLogError, match="does not start with a chain record"):
        entries(tmp_path)


def test_a_segment_removed_from_the_middle_or_renamed_is_refused(tmp_path: Path) -> None:
    write(tmp_path, count=40, segment_bytes=200)
    segments = sorted(tmp_path.glob("wal-*.log"))
    assert len(segments) >= 4
    segments[2].unlink()
    with pytest.raises(TamperedLogError, match="does not follow"):
        entries(tmp_path)
    write(tmp_path / "b", count=40, segment_bytes=200)
    segments = sorted((tmp_path / "b").glob("wal-*.log"))
    segments[1].rename(segments[1].with_name("wal-0000000000000099.log"))
    with pytest.raises(TamperedLogError):
        entries(tmp_path / "b")


def test_a_cut_tail_is_the_documented_limit(tmp_path: Path) -> None:
    """The chain is intact up to any point: records cut from the end cannot be told from
    writes that never happened (Raft re-fetches them from a quorum)."""
    write(tmp_path)
    rewrite(tmp_path, lambda p: p[:-4])
    assert entries(tmp_path) == [b"cmd1", b"cmd2", b"cmd3", b"cmd4"]


def test_offline_tools_read_an_authenticated_log_but_cannot_write_it(tmp_path: Path) -> None:
    write(tmp_path)
    assert entries(tmp_path, auth=None) == entries(tmp_path)
    with DurableLog.open(tmp_path, fsync=False) as log:
        assert log.read_only
        with pytest.raises(StorageError, match="read-only"):
            log.append([Entry(1, 7, data=b"x")])


def snapshot(index: int = 5) -> Snapshot:
    return Snapshot(SnapshotMeta(index, 1, ConfState(voters=("a",))), b"state")


def test_snapshots_are_authenticated(tmp_path: Path) -> None:
    SnapshotStore(LocalDisk(tmp_path), fsync=False, auth=MINE).save(snapshot())
    assert SnapshotStore(LocalDisk(tmp_path), fsync=False, auth=MINE).load_newest().data == b"state"
    assert SnapshotStore(LocalDisk(tmp_path), fsync=False).load_newest().data == b"state"  # offline
    with pytest.raises(CorruptSnapshotError, match="tag does not verify"):
        SnapshotStore(LocalDisk(tmp_path), fsync=False, auth=THEIRS).load_newest()
    # A snapshot of the host's own making (the plain format, or the tagged one with a guess).
    fabricated = tmp_path / "fake"
    fabricated.mkdir()
    SnapshotStore(LocalDisk(fabricated), fsync=False).save(snapshot(9))
    with pytest.raises(CorruptSnapshotError, match="not authenticated"):
        SnapshotStore(LocalDisk(fabricated), fsync=False, auth=MINE).load_newest()
    path = next(tmp_path.glob("snap-*.snap"))
    raw = path.read_bytes()
    path.write_bytes(raw[:-TAG_SIZE] + bytes(TAG_SIZE))
    with pytest.raises(CorruptSnapshotError, match="tag does not verify"):
        SnapshotStore(LocalDisk(tmp_path), fsync=False, auth=MINE).load_newest()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(record=st.integers(0, 13), position=st.integers(0, 200), value=st.integers(0, 255))
def test_any_edited_byte_with_a_fixed_checksum_is_refused(
    tmp_path_factory: pytest.TempPathFactory, record: int, position: int, value: int
) -> None:
    path = tmp_path_factory.mktemp("log")
    write(path)

    def change(payloads: list[bytes]) -> list[bytes]:
        target = payloads[record % len(payloads)]
        at = position % len(target)
        if target[at] == value:
            return payloads
        payloads[record % len(payloads)] = target[:at] + bytes([value]) + target[at + 1 :]
        return payloads

    original = segment(path).read_bytes()
    rewrite(path, change)
    if segment(path).read_bytes() == original:
        return  # the "edit" changed nothing
    with pytest.raises(TamperedLogError):
        entries(path)
