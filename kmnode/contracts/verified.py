"""The cache's backing: the host's store, trusted for nothing, behind the enclave's checks.

The host keeps sealed records by hidden key (``HostStore``: an external cache and a durable
store, later SQLite in the node's data directory; a dict in tests). The enclave keeps, per
contract, the version it last wrote of every key (and which keys it deleted): that table is
what makes the host's answers checkable. A load opens the record (``StateSealer.open``) and
insists on exactly the version the table holds, so each way a host can lie is named:
a changed record ``flipped``, another key's record ``swapped``, an older copy (or a deleted
key brought back) ``stale``, a record withheld ``missing``, one the enclave never wrote
``swapped``. A write-back batch bumps each key's version and seals it.

The state root is a hash over the live keys' hidden names and keyed value digests, in order:
what the state *is*, not how it got there, so it is the same on every node that executed the
same calls whatever its cache wrote back when (versions, which count write-backs, differ
between nodes with different cache settings, and stay out of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kmnode.contracts.sealed_state import StateSealer, TamperError


def state_root(contract: str, live: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A contract's state root from its live keys' (hidden name, value digest) pairs, in
    hidden-name order: what the state is, not how it got there (see the module docstring)."""
    digest = hashlib.blake2b(contract.encode(), digest_size=32, person=b"kmsim-root")
    for hidden, value_digest in sorted(live):
        digest.update(hidden + value_digest)
    return digest.digest()


class HostStore(Protocol):
    """The host's side: sealed records by (contract, hidden key). A write-back batch arrives
    in one ``put_many`` (``None`` deletes), so a store across a process boundary pays one
    round trip per batch, not per key."""

    def get(self, contract: str, hidden: bytes) -> bytes | None: ...

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None: ...


class MemoryHostStore:
    """A ``HostStore`` in a dict (tests and benchmarks; a node's is on disk)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, bytes], bytes] = {}

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        return self.records.get((contract, hidden))

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None:
        for hidden, record in records.items():
            if record is None:
                self.records.pop((contract, hidden), None)
            else:
                self.records[(contract, hidden)] = record


@dataclass(frozen=True)
class _Written:
    version: int
    deleted: bool
    #: ``StateSealer.digest`` of the value (empty once deleted), for the state root.
    digest: bytes


class VerifiedBacking:
    """A ``Backing`` for the cache over an untrusted ``HostStore``. ``sealer`` gives each
    contract's ``StateSealer`` (its keys came through the KM flow)."""

    def __init__(self, store: HostStore, sealer: Callable[[str], StateSealer]) -> None:
        self._store = store
        self._sealer = sealer
        self._written: dict[str, dict[bytes, _Written]] = {}

    def load(self, contract: str, key: bytes) -> bytes | None:
        sealer = self._sealer(contract)
        hidden = sealer.hide(key)
        written = self._written.get(contract, {}).get(hidden)
        record = self._store.get(contract, hidden)
        if written is None or written.deleted:
            if record is None:
                return None
            if written is None:
                raise TamperError("swapped", "a record for a key this enclave never wrote")
            raise TamperError("stale", "a record for a key this enclave deleted")
        if record is None:
            raise sealer.missing(key, written.version)
        opened = sealer.open(key, record, seen_version=written.version)
        if opened.version != written.version:
            raise TamperError(
                "stale", f"version {opened.version}, not version {written.version} written last"
            )
        return opened.value

    def store(self, contract: str, writes: Mapping[bytes, bytes | None]) -> None:
        sealer = self._sealer(contract)
        table = self._written.setdefault(contract, {})
        records: dict[bytes, bytes | None] = {}
        written: dict[bytes, _Written] = {}
        for key, value in writes.items():
            hidden = sealer.hide(key)
            previous = table.get(hidden)
            version = (previous.version if previous is not None else 0) + 1
            records[hidden] = None if value is None else sealer.seal(key, value, version)
            digest = b"" if value is None else sealer.digest(value)
            written[hidden] = _Written(version, value is None, digest)
        # The table moves only once the host took the batch: if it failed, the versions the
        # enclave expects are still the ones the host holds.
        self._store.put_many(contract, records)
        table.update(written)

    def adopt(self, contract: str, records: Iterable[tuple[bytes, bytes]]) -> bytes:
        """Take ``records`` (hidden name, record: all the contract's records, as a checkpoint
        the host kept) as the contract's state, each opened and checked; the root they make.
        The caller compares it with a committed root before using the state; ``TamperError``
        if a record does not open."""
        sealer = self._sealer(contract)
        table: dict[bytes, _Written] = {}
        for hidden, record in records:
            if hidden in table:
                raise TamperError("swapped", "two records for one key")
            opened = sealer.open_hidden(hidden, record)
            table[hidden] = _Written(opened.version, False, sealer.digest(opened.value))
        self._written[contract] = table
        return self.root(contract)

    def forget(self) -> None:
        """Forget every version (before a restore replaces the state)."""
        self._written.clear()

    def root(self, contract: str) -> bytes:
        """The contract's state root (see ``state_root``)."""
        table = self._written.get(contract, {})
        return state_root(contract, ((h, w.digest) for h, w in table.items() if not w.deleted))

    def __repr__(self) -> str:
        keys = sum(len(t) for t in self._written.values())
        return f"VerifiedBacking(contracts={len(self._written)}, keys={keys})"


__all__ = ["HostStore", "MemoryHostStore", "VerifiedBacking", "state_root"]
