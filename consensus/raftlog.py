"""The Raft core's in-memory log: a snapshot boundary followed by contiguous entries.

The core keeps its whole log in memory (the durable copy is the driver's business) and forgets
the prefix covered by a snapshot when the application compacts. Besides the entries this module
tracks two positions the driver cares about:

* ``stable``: the last index the driver has confirmed durable (``advance``). The leader only
  counts its own log up to here towards a quorum, because an entry that is acknowledged but not
  on disk can vanish in a crash and take a "committed" entry with it.
* ``offered``: the last index already handed out in a ``Ready`` (so a second ``ready()`` before
  ``advance`` does not hand the same entries out twice).

Both are pulled back when a conflicting append truncates the tail.
"""

from __future__ import annotations

from consensus.types import Entry, Snapshot


class RaftLog:
    """Entries ``snapshot_index+1 .. last_index`` plus the term of the snapshot boundary."""

    __slots__ = ("applied", "commit", "entries", "offered", "snapshot", "stable")

    def __init__(self, snapshot: Snapshot, entries: tuple[Entry, ...] = ()) -> None:
        self.snapshot = snapshot
        self.entries: list[Entry] = []
        base = snapshot.meta.index
        for e in entries:
            # Tolerate a persisted log that overlaps the snapshot or has a gap after it: keep
            # only the contiguous run that follows the snapshot (the storage layer should never
            # hand us anything else, and a core that starts is better than one that throws).
            if e.index == base + len(self.entries) + 1:
                self.entries.append(e)
            elif e.index > base + len(self.entries) + 1:
                break
        self.commit = base
        self.applied = base
        self.stable = self.last_index
        self.offered = self.last_index

    # -- positions ---------------------------------------------------------------------------

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.meta.index

    @property
    def first_index(self) -> int:
        """The first index still held as an entry (one past the snapshot)."""
        return self.snapshot.meta.index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot.meta.index + len(self.entries)

    @property
    def last_term(self) -> int:
        if self.entries:
            return self.entries[-1].term
        return self.snapshot.meta.term

    def term(self, index: int) -> int | None:
        """Term of ``index``; ``None`` when it is compacted away or not in the log yet."""
        base = self.snapshot.meta.index
        if index == base:
            return self.snapshot.meta.term
        if base < index <= base + len(self.entries):
            return self.entries[index - base - 1].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry | None:
        base = self.snapshot.meta.index
        if base < index <= base + len(self.entries):
            return self.entries[index - base - 1]
        return None

    def slice(self, lo: int, hi: int, max_entries: int | None = None) -> tuple[Entry, ...]:
        """Entries with ``lo <= index < hi`` (clamped to what is held), at most ``max_entries``."""
        base = self.snapshot.meta.index
        lo = max(lo, base + 1)
        hi = min(hi, base + len(self.entries) + 1)
        if max_entries is not None:
            hi = min(hi, lo + max_entries)
        if hi <= lo:
            return ()
        return tuple(self.entries[lo - base - 1 : hi - base - 1])

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log is at least as up to date as ours."""
        my_term = self.last_term
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index)

    # -- mutation ----------------------------------------------------------------------------

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        """Append entries that start at ``last_index + 1`` or overwrite a conflicting tail.

        Returns the index from which the log changed (``last_index + 1`` when nothing was
        overwritten). Callers have already checked that the entries are contiguous and that
        nothing at or below ``commit`` is overwritten.
        """
        if not entries:
            return self.last_index + 1
        first = entries[0].index
        if first <= self.last_index:
            self.truncate_from(first)
        self.entries.extend(entries)
        return first

    def truncate_from(self, index: int) -> None:
        """Drop entries at ``index`` and above (a conflicting tail); never below the snapshot."""
        base = self.snapshot.meta.index
        index = max(index, base + 1)
        del self.entries[index - base - 1 :]
        self.stable = min(self.stable, index - 1)
        self.offered = min(self.offered, index - 1)

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry whose term differs from ours, or 0 if all match.

        A new entry past our last index counts as a conflict (it is where appending starts).
        """
        for e in entries:
            t = self.term(e.index)
            if t is None:
                if e.index > self.last_index:
                    return e.index
                # compacted: committed, so by log matching it is identical
                continue
            if t != e.term:
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest ``i <= index`` whose term is ``<= term`` (used for fast backtracking).

        Every entry in ``(i, index]`` has a term above ``term``, so none of them can match a
        log whose entry at ``index`` has ``term``; the leader can skip them in one round trip.
        """
        index = min(index, self.last_index)
        base = self.snapshot.meta.index
        while index > base:
            t = self.entries[index - base - 1].term
            if t <= term:
                return index
            index -= 1
        return index

    def compact(self, snapshot: Snapshot) -> None:
        """Forget entries up to ``snapshot.meta.index`` (which must be held, or be the base)."""
        base = self.snapshot.meta.index
        idx = snapshot.meta.index
        if idx <= base:
            return
        del self.entries[: idx - base]
        self.snapshot = snapshot

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log with a snapshot received from the leader."""
        self.snapshot = snapshot
        self.entries = []
        idx = snapshot.meta.index
        self.commit = idx
        self.applied = idx
        # The snapshot itself goes out in the next Ready; until advance it is not stable.
        self.stable = idx
        self.offered = idx

    # -- persistence bookkeeping -------------------------------------------------------------

    def unstable_entries(self) -> tuple[Entry, ...]:
        """Entries not yet handed out in a Ready."""
        if self.offered >= self.last_index:
            return ()
        return self.slice(self.offered + 1, self.last_index + 1)

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted entries up to ``index``; ignore it if that tail was replaced."""
        if self.term(index) == term and index > self.stable:
            self.stable = index
