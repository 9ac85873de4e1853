"""A dataset as its owner seals it, and the checks a service enclave makes before using it.

The owner encrypts the dataset locally under a fresh data key (DEK) and registers only digests
and the DEK wrapped to the cluster; the ciphertext (the "blob") stays with the owner or on a
node's host, which is trusted for nothing. So the enclave that later receives the DEK must
notice whatever the host did to the blob, and say what:

1. ``blob-digest``: the blob is not the one registered (sha256 of the ciphertext differs from
   ``digest_ct`` on the ledger), so any change by the host is caught before decrypting;
2. ``blob-decrypt``: the AEAD refuses it (a wrong DEK, or a blob sealed for another dataset:
   the AAD binds the dataset's name and plaintext digest, so a blob cut from one dataset does
   not open as another even when an owner reuses a DEK);
3. ``plaintext-digest``: it opened, but not to the plaintext registered (an owner who sealed
   one text and registered the digest of another).

XChaCha20-Poly1305 (IETF) because its 24-byte nonce can be random without a counter to keep:
``nonce | ciphertext-and-tag`` is the blob. No message or repr here carries plaintext or keys.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import ClassVar

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_KEYBYTES,
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
)
from nacl.exceptions import CryptoError

#: The largest blob (ciphertext, nonce and tag included) a dataset may have.
MAX_BLOB_BYTES = 16 << 20
DEK_BYTES: int = crypto_aead_xchacha20poly1305_ietf_KEYBYTES
NONCE_BYTES: int = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_BYTES = 16
_AAD_PREFIX = b"kmsim-dataset1\0"


class BlobError(ValueError):
    """A blob that must not be used; ``reason`` is a short code a refusal carries."""

    reason: ClassVar[str] = "blob"


class BlobTampered(BlobError):
    """The blob's bytes are not those registered (its sha256 differs from ``digest_ct``)."""

    reason = "blob-digest"


class BlobUndecryptable(BlobError):
    """The AEAD refused the blob: a wrong data key, or a blob sealed for another dataset."""

    reason = "blob-decrypt"


class BlobPlaintextMismatch(BlobError):
    """The blob opened, but its plaintext is not the one whose digest was registered."""

    reason = "plaintext-digest"


class BlobNameInvalid(BlobError):
    """A dataset name that cannot be bound into the AAD (empty, a NUL, not UTF-8)."""

    reason = "bad-name"


class BlobKeyInvalid(BlobError):
    """A data key of the wrong length given to ``seal_dataset``."""

    reason = "bad-key"


class BlobTooLarge(BlobError):
    """A plaintext whose blob would exceed ``MAX_BLOB_BYTES``."""

    reason = "blob-size"


@dataclass(frozen=True)
class SealedDataset:
    """What an owner keeps (``ciphertext``) and registers (digests and size)."""

    ciphertext: bytes = field(repr=False)
    digest_ct: str
    digest_pt: str
    size: int

    def __repr__(self) -> str:
        return (
            f"SealedDataset(size={self.size}, ciphertext=<{len(self.ciphertext)} bytes>, "
            f"digest_ct={self.digest_ct}, digest_pt={self.digest_pt})"
        )


def new_dek() -> bytes:
    """A fresh data key: one per dataset, so revealing one reveals nothing else."""
    return secrets.token_bytes(DEK_BYTES)


def seal_dataset(name: str, plaintext: bytes, dek: bytes) -> SealedDataset:
    """Encrypt ``plaintext`` as dataset ``name`` under ``dek`` with a random nonce."""
    if len(dek) != DEK_BYTES:
        raise BlobKeyInvalid(f"a data key is {DEK_BYTES} bytes, not {len(dek)}")
    if len(plaintext) > MAX_BLOB_BYTES - NONCE_BYTES - TAG_BYTES:
        raise BlobTooLarge(f"a dataset's blob is at most {MAX_BLOB_BYTES} bytes")
    digest_pt = hashlib.sha256(plaintext).hexdigest()
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _aad(name, digest_pt), nonce, dek
    )
    ciphertext = nonce + sealed
    return SealedDataset(
        ciphertext=ciphertext,
        digest_ct=hashlib.sha256(ciphertext).hexdigest(),
        digest_pt=digest_pt,
        size=len(plaintext),
    )


def open_dataset(name: str, ciphertext: bytes, dek: bytes, digest_ct: str, digest_pt: str) -> bytes:
    """The plaintext of dataset ``name``, after the three checks of the module docstring, in
    that order (the first that fails raises its ``BlobError``)."""
    aad = _aad(name, digest_pt)
    if len(ciphertext) > MAX_BLOB_BYTES:  # cannot be any registered blob: spare the hashing
        raise BlobTampered("the blob is larger than any dataset")
    if hashlib.sha256(ciphertext).hexdigest() != digest_ct:
        raise BlobTampered("the blob is not the one registered (ciphertext digest differs)")
    if len(dek) != DEK_BYTES or len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise BlobUndecryptable("the blob does not open with this data key")
    nonce, sealed = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, dek)
    except CryptoError:
        raise BlobUndecryptable("the blob does not open with this data key") from None
    if hashlib.sha256(plaintext).hexdigest() != digest_pt:
        raise BlobPlaintextMismatch("the blob opened to another plaintext than the one registered")
    return plaintext


def _aad(name: str, digest_pt: str) -> bytes:
    """``kmsim-dataset1 NUL name NUL digest_pt``: no NUL in the name, so the parts are
    unambiguous whatever the digest's text."""
    if not name or "\0" in name:
        raise BlobNameInvalid("a dataset name is non-empty and has no NUL")
    try:
        return _AAD_PREFIX + name.encode() + b"\0" + digest_pt.encode()
    except UnicodeEncodeError:
        raise BlobNameInvalid("a dataset name (and digest) must be valid Unicode text") from None
