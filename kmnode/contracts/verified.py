"""The cache's backing: the host's store, trusted for nothing, behind the enclave's checks.

The host keeps sealed records by hidden key (``HostStore``: an external cache and a durable
store, later SQLite in the node's data directory; a dict in tests). The enclave keeps, per
contract, the version it last wrote of every key (and which keys it deleted): that table is
what makes the host's answers checkable. A load opens the record (``StateSealer.open``) and
insists on exactly the version the table holds, so each way a host can lie is named:
a changed record ``flipped``, another key's record ``swapped``, an older copy (or a deleted
key brought back) ``stale``, a record withheld ``missing``, one the enclave never wrote
``swapped``. A write-back batch bumps each key's version and seals it.

The table is also the contract's state root: a hash over its entries in order, the same on
every node that executed the same calls (a checkpoint compares them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kmnode.contracts.sealed_state import StateSealer, TamperError


class HostStore(Protocol):
    """The host's side: sealed records by (contract, hidden key); ``None`` deletes."""

    def get(self, contract: str, hidden: bytes) -> bytes | None: ...

    def put(self, contract: str, hidden: bytes, record: bytes | None) -> None: ...


class MemoryHostStore:
    """A ``HostStore`` in a dict (tests and benchmarks; a node's is on disk)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, bytes], bytes] = {}

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        return self.records.get((contract, hidden))

    def put(self, contract: str, hidden: bytes, record: bytes | None) -> None:
        if record is None:
            self.records.pop((contract, hidden), None)
        else:
            self.records[(contract, hidden)] = record


@dataclass(frozen=True)
class _Written:
    version: int
    deleted: bool


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
        for key, value in writes.items():
            hidden = sealer.hide(key)
            previous = table.get(hidden)
            version = (previous.version if previous is not None else 0) + 1
            record = None if value is None else sealer.seal(key, value, version)
            self._store.put(contract, hidden, record)
            table[hidden] = _Written(version, value is None)

    def root(self, contract: str) -> bytes:
        """The contract's state root: its version table, hashed in hidden-key order."""
        digest = hashlib.blake2b(contract.encode(), digest_size=32, person=b"kmsim-root")
        for hidden, written in sorted(self._written.get(contract, {}).items()):
            digest.update(hidden + written.version.to_bytes(8, "big") + bytes([written.deleted]))
        return digest.digest()

    def __repr__(self) -> str:
        keys = sum(len(t) for t in self._written.values())
        return f"VerifiedBacking(contracts={len(self._written)}, keys={keys})"


__all__ = ["HostStore", "MemoryHostStore", "VerifiedBacking"]
