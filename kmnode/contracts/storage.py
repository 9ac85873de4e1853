"""What a contract call reads and writes, and where the cache's misses go.

A call sees one contract's keys (bytes to bytes) through ``Storage``; the VM's host functions
are its only users. ``Backing`` is what sits behind the service enclave's cache: later the
host's external cache and durable store, behind AEAD and digest checks; in tests, a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

#: The longest storage key and value a contract may use (longer ones are refused, not cut).
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024


class StorageLimitError(ValueError):
    """A key or value longer than the limits above (nothing was read or written)."""


def check_key(key: bytes) -> None:
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise StorageLimitError(f"a storage key is 1 to {MAX_KEY_BYTES} bytes, not {len(key)}")


def check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StorageLimitError(f"a storage value is at most {MAX_VALUE_BYTES} bytes")


class Storage(Protocol):
    """What one contract call reads and writes: its contract's keys."""

    def get(self, key: bytes) -> bytes | None: ...

    def set(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...


class Backing(Protocol):
    """Where cache misses go; writes arrive in batches (``None``: delete the key)."""

    def load(self, contract: str, key: bytes) -> bytes | None: ...

    def store(self, contract: str, writes: Mapping[bytes, bytes | None]) -> None: ...
