"""Platform certificates: the vendor root vouching for a platform's attestation key.

This plays the role of Intel's PCK certificate chain, flattened to one level: a verifier that
trusts the vendor root's public key can check that a quote was signed by genuine (simulated)
hardware, and learn that hardware's platform id and TCB status from signed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from attest import wire
from attest.errors import MalformedEvidence, UntrustedCertificate

#: How a refusal of a certificate under another vendor root reads (joins add a hint on it).
UNTRUSTED_ROOT = "is not signed by the vendor root"
_CERT_TAG = b"KMPC"
_CERT_BODY_TAG = b"KMCB"


class TcbStatus(StrEnum):
    """How current a platform's trusted computing base is (mirrors SGX TCB statuses)."""

    UP_TO_DATE = "up_to_date"
    SW_HARDENING_NEEDED = "sw_hardening_needed"
    CONFIGURATION_NEEDED = "configuration_needed"
    OUT_OF_DATE = "out_of_date"

    @property
    def code(self) -> int:
        return _TCB_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> TcbStatus:
        for status, value in _TCB_CODES.items():
            if value == code:
                return status
        raise MalformedEvidence(f"unknown TCB status code {code}")


_TCB_CODES = {status: index for index, status in enumerate(TcbStatus)}


@dataclass(frozen=True, slots=True)
class PlatformCertificate:
    platform_id: str
    tcb_status: TcbStatus
    attestation_key: bytes
    vendor_signature: bytes

    @staticmethod
    def signed_body(platform_id: str, tcb_status: TcbStatus, attestation_key: bytes) -> bytes:
        return wire.pack(
            _CERT_BODY_TAG,
            platform_id.encode("utf-8"),
            bytes([tcb_status.code]),
            attestation_key,
        )

    def encode(self) -> bytes:
        body = self.signed_body(self.platform_id, self.tcb_status, self.attestation_key)
        return wire.pack(_CERT_TAG, body, self.vendor_signature)

    @classmethod
    def decode(cls, data: bytes) -> PlatformCertificate:
        body, signature = wire.unpack(data, _CERT_TAG, 2, "platform certificate")
        platform_raw, tcb_raw, key = wire.unpack(body, _CERT_BODY_TAG, 3, "certificate body")
        return cls(
            platform_id=wire.text(platform_raw, "certificate platform id"),
            tcb_status=TcbStatus.from_code(wire.fixed(tcb_raw, 1, "certificate TCB")[0]),
            attestation_key=wire.fixed(key, 32, "certificate attestation key"),
            vendor_signature=wire.fixed(signature, 64, "certificate signature"),
        )

    def check_signed_by(self, vendor_root: VerifyKey) -> None:
        body = self.signed_body(self.platform_id, self.tcb_status, self.attestation_key)
        try:
            vendor_root.verify(body, self.vendor_signature)
        except BadSignatureError as exc:
            raise UntrustedCertificate(
                f"certificate for platform {self.platform_id!r} {UNTRUSTED_ROOT}"
            ) from exc
