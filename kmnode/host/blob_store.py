"""The host's store of dataset blobs (issue 15): ciphertext files named by their sha256.

Untrusted storage, like every host store: the owner encrypted the blob before it got here, the
ledger holds its digest, and the service enclave checks the digest (and the plaintext's)
before it uses a byte. What the store itself guarantees is only what keeps a node healthy: a
blob is accepted only if its bytes hash to the name it is stored under, none is larger than
``MAX_BLOB_BYTES``, all of them together stay under a quota, and a write is atomic (a crash
leaves the old file or the new one, never half of one).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from consensus.fileio import atomic_write
from kmnode.dataauth.blob import MAX_BLOB_BYTES
from kmnode.datadir import BLOB_DIR

_DIGEST = re.compile(r"[0-9a-f]{64}")
#: All blobs of one node together (bytes), unless configured otherwise.
DEFAULT_QUOTA_BYTES = 1 << 30


class BlobStoreError(ValueError):
    """A blob refused: wrong digest, too large, over the quota, or a malformed name."""


class BlobStore:
    def __init__(self, data_dir: Path, quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        self.dir = data_dir / BLOB_DIR
        self.quota_bytes = quota_bytes

    def _path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise BlobStoreError("a blob is named by its sha256 (64 lowercase hex digits)")
        return self.dir / digest

    def put(self, digest: str, data: bytes) -> bool:
        """Store ``data`` under ``digest``; False if it was there already (idempotent)."""
        path = self._path(digest)
        if len(data) > MAX_BLOB_BYTES:
            raise BlobStoreError(f"a blob is at most {MAX_BLOB_BYTES} bytes, not {len(data)}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobStoreError("the blob's bytes do not hash to its name")
        if path.exists():
            return False
        if self.used_bytes() + len(data) > self.quota_bytes:
            raise BlobStoreError(f"the blob store is full (quota {self.quota_bytes} bytes)")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, data)
        return True

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                return f.read(MAX_BLOB_BYTES + 1)
        except FileNotFoundError:
            return None

    def digests(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if _DIGEST.fullmatch(p.name))

    def used_bytes(self) -> int:
        return sum((self.dir / d).stat().st_size for d in self.digests())

    def tamper(self, digest: str) -> bool:
        """Chaos (``kmctl chaos tamper-blob``): flip one bit of a stored blob, as a hostile
        host would; False if this node has no such blob."""
        path = self._path(digest)
        try:
            with open(path, "r+b") as f:
                data = f.read()
                if not data:
                    return False
                middle = len(data) // 2
                f.seek(middle)
                f.write(bytes([data[middle] ^ 0x01]))
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        return f"BlobStore({str(self.dir)!r})"
