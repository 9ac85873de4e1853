"""An in-memory stand-in for the durable log, with crash semantics the simulator can break.

It keeps exactly what a real node would find on disk after a crash: the last snapshot, the
entries after it and the hard state. ``write`` applies a ``Ready`` the way the storage layer
does (snapshot, then entries, then hard state); ``write(ready, keep=k)`` applies only the first
``k`` of those records, which is what a crash in the middle of an unsynced write leaves behind
(a torn tail). A torn write is only ever applied to a Ready whose messages were never sent, so
the records it loses were never acknowledged to anyone.
"""

from __future__ import annotations

from consensus.types import Entry, HardState, PersistedState, Ready, Snapshot


class MemStore:
    """Durable state of one simulated node."""

    __slots__ = ("entries", "hard_state", "snapshot")

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot = Snapshot()
        #: entries after ``snapshot.meta.index``, contiguous
        self.entries: list[Entry] = []

    @staticmethod
    def record_count(ready: Ready) -> int:
        """How many records a write of ``ready`` consists of (the unit of tearing)."""
        return (
            (1 if ready.snapshot is not None else 0)
            + len(ready.entries)
            + (1 if ready.hard_state is not None else 0)
        )

    def write(self, ready: Ready, keep: int | None = None) -> None:
        """Persist ``ready`` (or only its first ``keep`` records, for a torn write)."""
        budget = self.record_count(ready) if keep is None else keep
        if ready.snapshot is not None:
            if budget <= 0:
                return
            budget -= 1
            self._install(ready.snapshot)
        for e in ready.entries:
            if budget <= 0:
                return
            budget -= 1
            self._append(e)
        if ready.hard_state is not None and budget > 0:
            self.hard_state = ready.hard_state

    def _install(self, snap: Snapshot) -> None:
        base = self.snapshot.meta.index
        idx = snap.meta.index
        if idx <= base:
            return
        keep_from = idx - base
        if keep_from <= len(self.entries) and self.entries[keep_from - 1].term == snap.meta.term:
            self.entries = self.entries[keep_from:]
        else:
            self.entries = []
        self.snapshot = snap

    def _append(self, e: Entry) -> None:
        base = self.snapshot.meta.index
        pos = e.index - base - 1
        if pos < 0:
            return
        if pos < len(self.entries):
            del self.entries[pos:]
        if pos == len(self.entries):
            self.entries.append(e)

    def compact(self, snap: Snapshot) -> None:
        """The application saved ``snap``: keep it and drop the entries it covers."""
        self._install(snap)

    def load(self) -> PersistedState:
        return PersistedState(
            hard_state=self.hard_state, snapshot=self.snapshot, entries=tuple(self.entries)
        )
