"""The simulated state machine: a hash chain over applied entries.

Two nodes that applied the same entries in the same order hold the same 32-byte digest, so
comparing digests per index checks state-machine safety without keeping every node's history.
A snapshot is just ``(index, digest)``, which lets the checker verify an installed snapshot
against the digest the cluster computed at that index.
"""

from __future__ import annotations

import hashlib

from consensus.types import Entry

GENESIS = bytes(32)


def chain(prev: bytes, entry: Entry) -> bytes:
    """Digest after applying ``entry`` on top of ``prev``."""
    h = hashlib.blake2b(prev, digest_size=32)
    h.update(b"%d:%d:%d:" % (entry.index, entry.term, int(entry.type)))
    h.update(entry.data)
    return h.digest()


def encode_snapshot(index: int, digest: bytes) -> bytes:
    return index.to_bytes(8, "big") + digest


def decode_snapshot(data: bytes) -> tuple[int, bytes]:
    """Inverse of ``encode_snapshot``; an empty snapshot is the genesis state."""
    if len(data) != 40:
        return 0, GENESIS
    return int.from_bytes(data[:8], "big"), data[8:]
