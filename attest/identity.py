"""Enclave identity: what a quote or report says about the code that produced it.

Like SGX's MRENCLAVE, the measurement is a hash of the enclave's code, so a modified enclave
cannot claim the identity of the original: the policy lists measurements, and the platform
(not the enclave) puts the measurement into every quote and report it produces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

MEASUREMENT_SIZE = 32


class EnclaveRole(StrEnum):
    """Which part of a node an enclave plays; the policy allows measurements per role."""

    KM = "km"
    SERVICE = "service"


def measure_sources(sources: Mapping[str, bytes]) -> bytes:
    """Measure enclave code given as ``{module path: source bytes}``.

    Paths are sorted and each entry is length-framed, so the result depends on every byte of
    every file and on the file names, but not on the order the caller listed them in.
    """
    digest = hashlib.sha256(b"kmsim-measurement-v1\0")
    for name in sorted(sources):
        encoded_name = name.encode("utf-8")
        body = sources[name]
        digest.update(len(encoded_name).to_bytes(4, "big") + encoded_name)
        digest.update(len(body).to_bytes(8, "big") + body)
    return digest.digest()


def signer_id(author: str) -> bytes:
    """The MRSIGNER stand-in: a hash naming who built and signed the enclave."""
    return hashlib.sha256(b"kmsim-signer-v1\0" + author.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """The identity the simulated hardware reports for an enclave it runs."""

    measurement: bytes
    signer: bytes
    product_id: int
    svn: int

    def __post_init__(self) -> None:
        if len(self.measurement) != MEASUREMENT_SIZE or len(self.signer) != MEASUREMENT_SIZE:
            raise ValueError("measurement and signer must be 32 bytes")
        if not (0 <= self.product_id < 2**16 and 0 <= self.svn < 2**16):
            raise ValueError("product_id and svn must fit in 16 bits")
