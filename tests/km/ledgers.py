"""Test helper: a ledger written entry by entry as a leader would log it (commands, signatures
of given KM enclaves over the one replicated state they all applied, signed snapshots), and
stored in a raft directory as a node's host would hold it."""

from __future__ import annotations

from pathlib import Path

from consensus.storage import DurableLog
from consensus.types import Entry, HardState, PersistedState, Snapshot, SnapshotMeta
from kmnode.km.enclave import KMEnclave
from kmnode.km.state import KMState

NOW = 1_800_000_000.0


class Builder:
    """A ledger written entry by entry: commands, signatures by given enclaves, snapshots."""

    def __init__(self) -> None:
        self.state = KMState()
        self.entries: list[Entry] = []
        self.index = 0

    def command(self, data: bytes, term: int = 1) -> object:
        self.index += 1
        self.entries.append(Entry(term, self.index, data=data))
        return self.state.apply(self.index, data)

    def commands(self, datas: list[bytes]) -> Builder:
        for data in datas:
            self.command(data)
        return self

    def sign(self, enclave: KMEnclave) -> object:
        """The enclave signs the state it has applied (the shared one), as its leader would."""
        enclave.state = self.state
        return self.command(enclave.ledger_signature(NOW).encode())

    def snapshot(self, enclave: KMEnclave) -> Snapshot:
        enclave.state = self.state
        meta = SnapshotMeta(self.index, self.entries[-1].term)
        return Snapshot(meta, enclave.snapshot_capture(meta.term, NOW)())

    def ledger(
        self, through: int | None = None, snapshot: Snapshot | None = None
    ) -> PersistedState:
        """The ledger as stored: entries up to ``through``, after ``snapshot`` if given."""
        last = self.index if through is None else through
        after = snapshot.meta.index if snapshot is not None else 0
        kept = tuple(e for e in self.entries if after < e.index <= last)
        return PersistedState(HardState(1, "km1", last), snapshot or Snapshot(), kept)

    def store(self, raft_dir: Path, through: int | None = None) -> None:
        """Write the ledger (up to ``through``) as a node's raft directory (no record keys:
        what an offline verifier reads is the same either way)."""
        ledger = self.ledger(through)
        with DurableLog.open(raft_dir, fsync=False) as log:
            log.append(list(ledger.entries), ledger.hard_state)
