"""Contract state as the host stores it: hidden keys, deterministic AEAD, versions.

The host keeps every contract's state (an external cache and a durable store) but must learn
nothing from it and change nothing in it unnoticed. Per contract, a 32-byte state key
(released to the service enclave through the KM flow, like any key) yields two keys:

* a MAC key that hides storage keys: the host sees ``hide(key)``, a keyed BLAKE2b, never the
  key itself (so it cannot tell which account a record belongs to);
* an AES-GCM-SIV key that seals each value with the AAD ``contract | hidden key | version |
  key generation``. GCM-SIV is deterministic (its nonce here derives from the hidden key and
  the version), so every node seals the same value to the same bytes and state roots can be
  compared across nodes; being misuse-resistant, a repeated nonce reveals only that the same
  value was sealed again under the same key and version.

A record is ``version (8 bytes) | hidden key (32) | sealed value``. Opening one checks, in
order, and names what the host did (``TamperError.kind``):

* ``swapped``: the record belongs to another key (its hidden key is not the one asked for);
* ``stale``: its version is lower than one this enclave has already seen for the key (a
  rollback to an older copy);
* ``flipped``: the AEAD refuses it (any byte changed, or the version field edited);
* ``missing``: no record where the enclave knows one exists (judged by the caller, which
  knows; see ``missing``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

VERSION_BYTES = 8
HIDDEN_BYTES = 32
NONCE_BYTES = 12
TamperKind = Literal["swapped", "stale", "flipped", "missing"]


class TamperError(Exception):
    """A record the host handed back is not the one this enclave wrote (``kind`` says how)."""

    def __init__(self, kind: TamperKind, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind: TamperKind = kind


@dataclass(frozen=True)
class Opened:
    value: bytes
    version: int


class StateSealer:
    """One contract's state keys (derived from its released state key and generation)."""

    def __init__(self, contract: str, state_key: bytes, generation: int) -> None:
        if len(state_key) != 32:
            raise ValueError("a contract state key is 32 bytes")
        if not 1 <= generation < 2**32:
            raise ValueError("a key generation is 1 to 2**32 - 1")
        self.contract = contract.encode()
        self.generation = generation
        self._hide_key = _derive(state_key, b"hide")
        self._aead = AESGCMSIV(_derive(state_key, b"seal"))

    def hide(self, key: bytes) -> bytes:
        """The name the host stores ``key`` under (a keyed hash, per contract)."""
        return hashlib.blake2b(
            len(self.contract).to_bytes(2, "big") + self.contract + key,
            key=self._hide_key,
            digest_size=HIDDEN_BYTES,
        ).digest()

    def digest(self, value: bytes) -> bytes:
        """A keyed digest of a value (for the state root: equal values give equal digests on
        every node, and a published root says nothing about a guessable value)."""
        return hashlib.blake2b(value, key=self._hide_key, digest_size=32, person=b"value").digest()

    def seal(self, key: bytes, value: bytes, version: int) -> bytes:
        """The record of ``value`` as version ``version`` of ``key`` (deterministic)."""
        if not 0 < version < 2**63:
            raise ValueError("a version is 1 to 2**63 - 1")
        hidden = self.hide(key)
        header = version.to_bytes(VERSION_BYTES, "big") + hidden
        return header + self._aead.encrypt(self._nonce(hidden, version), value, self._aad(header))

    def open(self, key: bytes, record: bytes, seen_version: int = 0) -> Opened:
        """The value a record holds for ``key``, if this enclave sealed it and it is not older
        than ``seen_version``; ``TamperError`` naming what is wrong otherwise."""
        return self.open_hidden(self.hide(key), record, seen_version)

    def open_hidden(self, hidden: bytes, record: bytes, seen_version: int = 0) -> Opened:
        """``open`` by hidden name: for a restore, which reads the records the host lists
        and knows no storage key (the AEAD still binds the record to ``hidden``)."""
        if len(record) < VERSION_BYTES + HIDDEN_BYTES + 16:
            raise TamperError("flipped", f"a record of {len(record)} bytes is too short")
        version = int.from_bytes(record[:VERSION_BYTES], "big")
        if record[VERSION_BYTES : VERSION_BYTES + HIDDEN_BYTES] != hidden:
            raise TamperError("swapped", "the record belongs to another key")
        if version < seen_version:
            raise TamperError(
                "stale", f"version {version} is older than version {seen_version}, seen before"
            )
        header = record[: VERSION_BYTES + HIDDEN_BYTES]
        try:
            value = self._aead.decrypt(
                self._nonce(hidden, version), record[len(header) :], self._aad(header)
            )
        except InvalidTag:
            raise TamperError("flipped", "the record does not authenticate") from None
        return Opened(value, version)

    def missing(self, key: bytes, seen_version: int) -> TamperError:
        """What to raise when the host has no record of a key this enclave wrote."""
        del key  # named for the caller's clarity; the message must not carry it
        return TamperError("missing", f"no record, though version {seen_version} was written")

    def _aad(self, header: bytes) -> bytes:
        return (
            len(self.contract).to_bytes(2, "big")
            + self.contract
            + header
            + self.generation.to_bytes(4, "big")
        )

    @staticmethod
    def _nonce(hidden: bytes, version: int) -> bytes:
        return hashlib.blake2b(
            hidden + version.to_bytes(VERSION_BYTES, "big"), digest_size=NONCE_BYTES
        ).digest()

    def __repr__(self) -> str:
        return f"StateSealer(contract={self.contract.decode()!r}, generation={self.generation})"


def _derive(state_key: bytes, purpose: bytes) -> bytes:
    return hashlib.blake2b(
        purpose, key=state_key, person=b"kmsim-contract", digest_size=32
    ).digest()


__all__ = ["Opened", "StateSealer", "TamperError", "TamperKind"]
