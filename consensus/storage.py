"""The durable Raft log: segment files of checksummed records plus snapshot files.

Layout of a data directory::

    wal-0000000000000001.log    segments, append-only, replayed in sequence order
    snap-<index>-<term>.snap    the newest snapshot (older ones are deleted once it is durable)

Each ``append`` (one ``Ready``) becomes one ``write`` and one ``fdatasync``: that is the group
commit, since a Ready carries every proposal and message the core accepted since the last one.
The hard state is a record in the same log, so it is durable by the same fsync and atomic by the
record checksum (no temp file + rename per Ready, which would triple the fsyncs).

The log is never rewritten in place. A conflicting append (a new leader overwrote a suffix) just
appends the new entries; replay applies "an entry at index i discards every entry at or after
i", which is what the truncation means. Installing a snapshot from the leader appends a
snapshot record, which on replay discards the whole log before it. Every segment starts with the
current hard state, so compaction can delete whole segments whose entries are all covered by
the newest snapshot without losing the hard state.

Torn tails and corruption follow the rule documented in ``consensus.segments``.

With a ``RecordAuth`` (``consensus.recordauth``), every record carries a MAC chained through the
whole log and every segment starts with a chain record; a log opened with its key refuses any
record that fails (``TamperedLogError``), and refuses segments and snapshots written without
one. A log opened without a key (offline tools) reads an authenticated log, without checking
it, and cannot append to it.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from consensus.disk import Disk, LocalDisk
from consensus.recordauth import (
    TAG_SIZE,
    Chain,
    RecordAuth,
    chain_payload,
    is_chain_record,
    parse_chain,
)
from consensus.segments import (
    CorruptLogError,
    Damage,
    StorageError,
    TamperedLogError,
    encode_record,
    find_intact_record,
    read_records,
)
from consensus.snapstore import CorruptSnapshotError, SnapshotStore
from consensus.types import Entry, EntryType, HardState, PersistedState, Ready, Snapshot

__all__ = [
    "CorruptLogError",
    "CorruptSnapshotError",
    "DurableLog",
    "StorageError",
    "TamperedLogError",
]

log = logging.getLogger(__name__)

REC_ENTRY = 1
REC_HARD_STATE = 2
REC_SNAPSHOT = 3

_ENTRY = struct.Struct("<BQQB")
_HARD = struct.Struct("<BQQ")
_SNAP = struct.Struct("<BQQ")
_SEGMENT_NAME = re.compile(r"^wal-(\d{16})\.log$")

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


def _entry_payload(e: Entry) -> bytes:
    return _ENTRY.pack(REC_ENTRY, e.term, e.index, e.type) + e.data


def _hard_payload(hs: HardState) -> bytes:
    return _HARD.pack(REC_HARD_STATE, hs.term, hs.commit) + hs.vote.encode()


@dataclass(slots=True)
class _Segment:
    seq: int
    #: Where it is (for messages); the disk knows it by ``name``.
    path: Path
    size: int
    #: Highest entry index ever written to this segment (stale entries included), so a segment
    #: is deletable once the snapshot covers it.
    max_index: int

    @property
    def name(self) -> str:
        return self.path.name


class _Replay:
    """Rebuilds the log from records in order; see the module docstring for the rules."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.base: int | None = None  # index just before ``entries[0]``
        self.entries: list[Entry] = []
        self.snapshot_floor = 0

    def apply(self, seg: _Segment, offset: int, payload: bytes) -> None:
        kind = payload[0]
        if kind == REC_ENTRY and len(payload) >= _ENTRY.size:
            _, term, index, etype = _ENTRY.unpack_from(payload)
            try:
                entry = Entry(term, index, EntryType(etype), payload[_ENTRY.size :])
            except ValueError as exc:
                raise CorruptLogError(seg.path, offset, f"unknown entry type {etype}") from exc
            seg.max_index = max(seg.max_index, index)
            self._entry(seg, offset, entry)
        elif kind == REC_HARD_STATE and len(payload) >= _HARD.size:
            _, term, commit = _HARD.unpack_from(payload)
            try:
                vote = payload[_HARD.size :].decode()
            except UnicodeDecodeError as exc:
                raise CorruptLogError(seg.path, offset, "vote is not UTF-8") from exc
            self.hard_state = HardState(term=term, vote=vote, commit=commit)
        elif kind == REC_SNAPSHOT and len(payload) >= _SNAP.size:
            _, index, _term = _SNAP.unpack_from(payload)
            self.base = index
            self.entries = []
            self.snapshot_floor = max(self.snapshot_floor, index)
        else:
            raise CorruptLogError(seg.path, offset, f"unknown record kind {kind}")

    def _entry(self, seg: _Segment, offset: int, entry: Entry) -> None:
        if self.base is None:
            self.base = entry.index - 1
        nxt = self.base + len(self.entries) + 1
        if entry.index == nxt:
            self.entries.append(entry)
        elif entry.index <= self.base:
            return  # below a snapshot: already compacted away
        elif entry.index < nxt:
            del self.entries[entry.index - self.base - 1 :]  # a conflicting append
            self.entries.append(entry)
        else:
            raise CorruptLogError(
                seg.path, offset, f"gap in the log: entry {entry.index} after {nxt - 1}"
            )

    def result(self, snapshot: Snapshot) -> PersistedState:
        snap_index = snapshot.meta.index
        if self.snapshot_floor > snap_index:
            raise StorageError(
                f"log was reset to a snapshot at {self.snapshot_floor}, "
                f"but the newest snapshot file is at {snap_index}"
            )
        entries = self.entries
        if entries:
            first = entries[0].index
            if first > snap_index + 1:
                raise StorageError(
                    f"log starts at {first} but the snapshot ends at {snap_index}: entries lost"
                )
            entries = entries[max(0, snap_index + 1 - first) :]
        return PersistedState(hard_state=self.hard_state, snapshot=snapshot, entries=tuple(entries))


def _authenticated(
    seg: _Segment, records: list[tuple[int, bytes]], chain: Chain, *, first: bool
) -> list[tuple[int, bytes]]:
    """The payloads of one segment's records, each checked against the chain; raises
    ``TamperedLogError`` naming the first record that is out of place or changed."""
    if not records:
        return []
    offset, framed = records[0]
    header = parse_chain(framed[:-TAG_SIZE]) if len(framed) > TAG_SIZE else None
    if header is None:
        raise TamperedLogError(seg.path, offset, "the segment does not start with a chain record")
    seq, carried = header
    if seq != seg.seq:
        raise TamperedLogError(seg.path, offset, f"the segment's chain record names segment {seq}")
    if first:
        chain.restart(carried)  # the oldest segment left: whatever came before was compacted
    elif carried != chain.last:
        raise TamperedLogError(
            seg.path, offset, "the segment does not follow the one before it (segments removed, "
            "replaced or reordered)"
        )  # fmt: skip
    out = []
    for offset, framed in records:
        payload = chain.check(framed)
        if payload is None:
            raise TamperedLogError(
                seg.path, offset, "tag does not verify (the record was changed, moved or "
                "comes from another node's log)"
            )  # fmt: skip
        out.append((offset, payload))
    return out[1:]


class DurableLog:
    """A node's Raft log and hard state on disk. Not thread-safe: one caller at a time.

    Use :meth:`open`; ``initial_state`` is what the core is rebuilt from. ``append``/``persist``
    return only after the data is durable (unless ``fsync=False``, which is for benchmarks).
    """

    def __init__(
        self,
        disk: Disk,
        *,
        fsync: bool,
        segment_bytes: int,
        segments: list[_Segment],
        state: PersistedState,
        chain: Chain | None = None,
        read_only: bool = False,
    ) -> None:
        #: Where the files are; a deferred disk (a host's) is awaited with ``durable``.
        self.disk = disk
        self.directory = disk.path
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._segments = segments
        #: The record chain of an authenticated log (None: records carry no tags).
        self._chain = chain
        #: An authenticated log opened without its key: readable, not writable.
        self.read_only = read_only
        self._snapshots = SnapshotStore(
            disk, fsync=fsync, auth=chain.auth if chain is not None else None
        )
        self.initial_state = state
        self.hard_state = state.hard_state
        self.snapshot_index = state.snapshot.meta.index
        self.last_index = state.entries[-1].index if state.entries else self.snapshot_index
        self.fsyncs = 0
        self.bytes_written = 0
        self._closed = False
        self._open_active()

    # -- start-up ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str] | Disk,
        *,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        auth: RecordAuth | None = None,
    ) -> DurableLog:
        """Open (creating if needed) the log in ``directory`` (a path, or a ``Disk``: a deferred
        one blocks this thread on each read, so open it off the event loop) and replay it.

        Raises ``CorruptLogError`` / ``CorruptSnapshotError`` rather than start on damaged data
        (with ``auth``: ``TamperedLogError`` for a record that fails authentication); a torn
        tail is truncated and logged at WARNING.
        """
        disk = LocalDisk(directory) if isinstance(directory, str | os.PathLike) else directory
        path = disk.path
        listing = disk.listing()
        snapshot = SnapshotStore(disk, fsync=fsync, auth=auth).load_newest(listing)
        segments = sorted(
            (
                _Segment(int(m.group(1)), path / name, size, 0)
                for name, size in listing.items()
                if (m := _SEGMENT_NAME.match(name))
            ),
            key=lambda s: s.seq,
        )
        replay = _Replay()
        chain = Chain(auth) if auth is not None else None
        keyless_tagged = False
        for i, seg in enumerate(segments):
            content = disk.read(seg.name)  # one segment in memory at a time
            records, damage = read_records(content)
            if chain is not None:
                records = _authenticated(seg, records, chain, first=i == 0)
            elif records and is_chain_record(records[0][1]):
                keyless_tagged = True
                records = [(off, framed[:-TAG_SIZE]) for off, framed in records[1:]]
            for offset, payload in records:
                replay.apply(seg, offset, payload)
            if damage is not None:
                cls._recover_tail(disk, segments, content, i, damage, fsync)
                del segments[i + 1 :]
                break
            del content, records
        state = replay.result(snapshot)
        if not segments:
            segments.append(_Segment(1, path / "wal-0000000000000001.log", 0, 0))
        return cls(
            disk,
            fsync=fsync,
            segment_bytes=segment_bytes,
            segments=segments,
            state=state,
            chain=chain,
            read_only=keyless_tagged,
        )

    @staticmethod
    def _recover_tail(
        disk: Disk, segments: list[_Segment], content: bytes, i: int, damage: Damage, fsync: bool
    ) -> None:
        """Truncate a torn tail, or raise ``CorruptLogError`` if an intact record follows."""
        seg = segments[i]
        after = find_intact_record(content, damage.offset + 1)
        if after is None:
            for later in segments[i + 1 :]:
                if find_intact_record(disk.read(later.name), 0) is not None:
                    after = 0
                    break
        if after is not None:
            raise CorruptLogError(
                seg.path, damage.offset, f"{damage.reason}, and intact records follow it"
            )
        dropped = len(content) - damage.offset
        log.warning(
            "torn tail in %s at offset %d (%s): truncating %d bytes",
            seg.path,
            damage.offset,
            damage.reason,
            dropped,
        )
        disk.truncate(seg.name, damage.offset)
        if fsync:
            disk.sync(seg.name)
        seg.size = damage.offset
        for later in segments[i + 1 :]:
            log.warning("removing segment %s after the torn tail (no intact records)", later.path)
            disk.delete(later.name)
        if fsync:
            disk.sync_dir()

    def _open_active(self) -> None:
        active = self._segments[-1]
        if self.read_only:
            return
        # An empty active segment (new, or truncated to nothing) must start with the hard state:
        # older segments holding it may be deleted by compaction. In an authenticated log the
        # chain record comes first: it names the segment and carries the chain on.
        if active.size == 0:
            records = []
            if self._chain is not None:
                records.append(self._record(chain_payload(active.seq, self._chain.last)))
            records.append(self._record(_hard_payload(self.hard_state)))
            self._write(records, active)
            self._sync(directory=True)

    def _record(self, payload: bytes) -> bytes:
        """One framed record, with its chained tag in an authenticated log."""
        if self._chain is not None:
            payload = self._chain.seal(payload)
        return encode_record(payload)

    # -- writing -------------------------------------------------------------------------------

    def persist(self, ready: Ready, *, sync: bool = True) -> None:
        """Make a Ready's snapshot, entries and hard state durable with one fsync."""
        if ready.has_writes:
            self.append(ready.entries, ready.hard_state, ready.snapshot, sync=sync)

    def append(
        self,
        entries: tuple[Entry, ...] | list[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        *,
        sync: bool = True,
    ) -> None:
        """Durably record (in this order) a snapshot from the leader, entries and hard state.

        Entries at or below the current last index replace the existing suffix from there on.
        ``sync=False`` writes without fsync: for a hard state that differs from the durable one
        only in its commit index, which Raft may lose in a crash (it is re-learned from the
        leader), so it need not cost an fsync of its own; the next synced append covers it.
        """
        if self.read_only:
            raise StorageError("an authenticated log opened without its key is read-only")
        if self._closed:
            raise StorageError("log is closed")
        records: list[bytes] = []
        active = self._segments[-1]
        if snapshot is not None and not snapshot.is_empty:
            # The snapshot file is durable before the record that resets the log to it.
            self._snapshots.save(snapshot)
            records.append(
                self._record(_SNAP.pack(REC_SNAPSHOT, snapshot.meta.index, snapshot.meta.term))
            )
            self.snapshot_index = snapshot.meta.index
            self.last_index = snapshot.meta.index
        if entries:
            records.extend([self._record(_entry_payload(e)) for e in entries])
            last = entries[-1].index
            active.max_index = max(active.max_index, last)
            self.last_index = last
        if hard_state is not None:
            records.append(self._record(_hard_payload(hard_state)))
            self.hard_state = hard_state
        if not records:
            return
        self._write(records, active)
        if sync:
            self._sync()
        if snapshot is not None and not snapshot.is_empty:
            self._delete_covered_segments()
        if active.size >= self.segment_bytes:
            self._rotate()

    def compact(self, snapshot: Snapshot) -> None:
        """Store a snapshot of the local state machine and drop the segments it covers.

        Entries after ``snapshot.meta.index`` stay in the log (unlike a snapshot installed from
        the leader, which replaces the log).
        """
        if snapshot.meta.index <= self.snapshot_index:
            return
        self.write_snapshot(snapshot)
        self.drop_covered(snapshot)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """The first half of `compact`: write the snapshot file durably, nothing else.

        It touches only snapshot files, so it may run in another thread while the owner keeps
        appending entries (the one exception to "one caller at a time"); a snapshot installed
        from the leader meanwhile is newer, and the newest file is the one loaded.
        """
        if snapshot.meta.index <= self.snapshot_index:
            return
        self._snapshots.save(snapshot)

    def drop_covered(self, snapshot: Snapshot) -> None:
        """The second half of `compact`, once `write_snapshot` returned: count the snapshot as
        the log's base and delete the segments it covers (owner's thread, like `persist`)."""
        if snapshot.meta.index <= self.snapshot_index:
            return
        self.snapshot_index = snapshot.meta.index
        self._delete_covered_segments()

    def _write(self, records: list[bytes], seg: _Segment) -> None:
        data = b"".join(records)
        self.disk.append(seg.name, data)
        seg.size += len(data)
        self.bytes_written += len(data)

    def _sync(self, *, directory: bool = False) -> None:
        if not self.fsync:
            return
        self.disk.sync(self._segments[-1].name)
        self.fsyncs += 1
        if directory:
            self.disk.sync_dir()

    def durable(self) -> Awaitable[None]:
        """What to await for everything written so far to be done (at once on a local disk;
        a host's disk is asked now and waited for: see ``consensus.disk``)."""
        return self.disk.durable()

    def _rotate(self) -> None:
        """Start a new segment that begins with the current hard state."""
        seq = self._segments[-1].seq + 1
        self._segments.append(_Segment(seq, self.directory / f"wal-{seq:016d}.log", 0, 0))
        self._open_active()

    def _delete_covered_segments(self) -> None:
        removed = False
        while len(self._segments) > 1 and self._segments[0].max_index <= self.snapshot_index:
            seg = self._segments.pop(0)
            log.info("compaction removes %s (entries up to %d)", seg.path, seg.max_index)
            self.disk.delete(seg.name)
            removed = True
        if removed and self.fsync:
            self.disk.sync_dir()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def segment_paths(self) -> list[Path]:
        return [s.path for s in self._segments]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.disk.close()

    def __enter__(self) -> DurableLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
