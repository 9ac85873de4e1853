"""Sealing: encrypting enclave state so only the same enclave on the same platform can read it.

A restarted node must resume with its enclave state (master secret, identity) without the host
ever seeing it. The sealing key comes from the platform's fused secret and the enclave's
measurement, so the blob on disk is useless on another machine or to modified enclave code.
The header (platform, measurement) is authenticated as associated data: it serves clear error
messages, and tampering with it breaks authentication like any other byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nacl.utils
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
)
from nacl.exceptions import CryptoError

from attest import wire
from attest.errors import (
    MalformedEvidence,
    SealedByOtherEnclave,
    SealedDataCorrupt,
    SealedOnOtherPlatform,
    SealingError,
)

if TYPE_CHECKING:
    from attest.hardware import EnclaveContext

_SEALED_TAG = b"KMSL"
_HEADER_TAG = b"KMSH"
_NONCE_SIZE = int(crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)


def _header(enclave: EnclaveContext) -> bytes:
    return wire.pack(_HEADER_TAG, enclave.platform_id.encode("utf-8"), enclave.identity.measurement)


def seal(enclave: EnclaveContext, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` to this enclave identity on this platform."""
    header = _header(enclave)
    nonce = nacl.utils.random(_NONCE_SIZE)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, header, nonce, enclave.seal_key()
    )
    return wire.pack(_SEALED_TAG, header, nonce, ciphertext)


def unseal(enclave: EnclaveContext, blob: bytes) -> bytes:
    """Decrypt a blob sealed by :func:`seal`, or raise a specific :class:`SealingError`."""
    try:
        header, nonce, ciphertext = wire.unpack(blob, _SEALED_TAG, 3, "sealed blob")
        platform_raw, measurement = wire.unpack(header, _HEADER_TAG, 2, "sealed header")
        platform_id = wire.text(platform_raw, "sealed platform id")
        wire.fixed(nonce, _NONCE_SIZE, "sealed nonce")
    except MalformedEvidence as exc:
        raise SealedDataCorrupt(f"sealed blob is malformed: {exc}") from exc
    if platform_id != enclave.platform_id:
        raise SealedOnOtherPlatform(
            f"sealed on platform {platform_id!r}; this is {enclave.platform_id!r}"
        )
    if measurement != enclave.identity.measurement:
        raise SealedByOtherEnclave(
            f"sealed by measurement {measurement.hex()[:16]}…; "
            f"this enclave is {enclave.identity.measurement.hex()[:16]}…"
        )
    try:
        return bytes(
            crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, header, nonce, enclave.seal_key()
            )
        )
    except CryptoError as exc:
        raise SealedDataCorrupt("sealed blob fails authentication: it was modified") from exc


__all__ = ["SealingError", "seal", "unseal"]
