"""Quotes: signed statements by a platform about an enclave, and their verification.

A quote is what one KM enclave shows another to prove "I am code with measurement M, running on
genuine platform P, and I vouch for these 64 bytes of report data". The report data is how a
protocol binds the quote to itself (an ephemeral key, the peer's nonce): without that binding a
quote could be replayed by anyone who once saw it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from attest import wire
from attest.certs import PlatformCertificate, TcbStatus
from attest.errors import (
    BadSignature,
    CertificateMismatch,
    MalformedEvidence,
    ReportDataMismatch,
    StaleQuote,
)
from attest.identity import EnclaveIdentity, EnclaveRole
from attest.policy import Policy

REPORT_DATA_SIZE = 64
_QUOTE_TAG = b"KMQ1"
_BODY_TAG = b"KMQB"


def report_data_for(label: bytes, *parts: bytes) -> bytes:
    """Derive 64 bytes of report data binding ``parts`` under a protocol ``label``.

    Hashing with a label keeps the bindings of different protocols (handshake initiator,
    responder, local attestation) from ever being confused with one another.
    """
    return hashlib.blake2b(wire.pack(b"KMRD", label, *parts), digest_size=REPORT_DATA_SIZE).digest()


@dataclass(frozen=True, slots=True)
class QuoteBody:
    """The signed part of a quote."""

    identity: EnclaveIdentity
    platform_id: str
    tcb_status: TcbStatus
    timestamp_ms: int
    report_data: bytes

    def encode(self) -> bytes:
        return wire.pack(
            _BODY_TAG,
            self.identity.measurement,
            self.identity.signer,
            wire.u16(self.identity.product_id),
            wire.u16(self.identity.svn),
            self.platform_id.encode("utf-8"),
            bytes([self.tcb_status.code]),
            wire.u64(self.timestamp_ms),
            self.report_data,
        )

    @classmethod
    def decode(cls, data: bytes) -> QuoteBody:
        fields = wire.unpack(data, _BODY_TAG, 8, "quote body")
        measurement, signer, product, svn, platform, tcb, stamp, report_data = fields
        return cls(
            identity=EnclaveIdentity(
                measurement=wire.fixed(measurement, 32, "quote measurement"),
                signer=wire.fixed(signer, 32, "quote signer"),
                product_id=wire.read_u16(product, "quote product id"),
                svn=wire.read_u16(svn, "quote svn"),
            ),
            platform_id=wire.text(platform, "quote platform id"),
            tcb_status=TcbStatus.from_code(wire.fixed(tcb, 1, "quote TCB")[0]),
            timestamp_ms=wire.read_u64(stamp, "quote timestamp"),
            report_data=wire.fixed(report_data, REPORT_DATA_SIZE, "quote report data"),
        )


@dataclass(frozen=True, slots=True)
class Quote:
    body: QuoteBody
    signed_body: bytes
    signature: bytes
    certificate: bytes

    def encode(self) -> bytes:
        return wire.pack(_QUOTE_TAG, self.signed_body, self.signature, self.certificate)

    @classmethod
    def decode(cls, data: bytes) -> Quote:
        signed_body, signature, certificate = wire.unpack(data, _QUOTE_TAG, 3, "quote")
        return cls(
            body=QuoteBody.decode(signed_body),
            signed_body=signed_body,
            signature=wire.fixed(signature, 64, "quote signature"),
            certificate=certificate,
        )


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """What a verifier may rely on after a quote passed every check."""

    role: EnclaveRole
    identity: EnclaveIdentity
    platform_id: str
    tcb_status: TcbStatus
    timestamp_ms: int
    report_data: bytes


@dataclass(slots=True)
class CheckLog:
    """Names of the checks a verification passed, in order, for operators who ask `why`."""

    passed: list[tuple[str, str]] = field(default_factory=list)

    def ok(self, check: str, detail: str) -> None:
        self.passed.append((check, detail))


class QuoteVerifier:
    """Verifies quotes against a vendor root, caching certificates already proven genuine.

    A quote carries two signatures (vendor over certificate, platform over body). Certificates
    are few and reused for every quote of a platform, so their verification result is cached by
    their exact bytes: a verifier then does one Ed25519 verification per quote, the floor.
    """

    def __init__(self, vendor_root: bytes, cache_size: int = 1024) -> None:
        self._vendor_root = VerifyKey(vendor_root)
        self._cache: OrderedDict[bytes, tuple[PlatformCertificate, VerifyKey]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def vendor_root(self) -> bytes:
        return bytes(self._vendor_root)

    def _certificate(self, encoded: bytes) -> tuple[PlatformCertificate, VerifyKey]:
        cached = self._cache.get(encoded)
        if cached is not None:
            self._cache.move_to_end(encoded)
            return cached
        certificate = PlatformCertificate.decode(encoded)
        certificate.check_signed_by(self._vendor_root)
        entry = (certificate, VerifyKey(certificate.attestation_key))
        self._cache[encoded] = entry
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def verify(
        self,
        quote: bytes | Quote,
        policy: Policy,
        expected_report_data: bytes,
        *,
        role: EnclaveRole,
        now: float,
        log: CheckLog | None = None,
    ) -> VerifiedIdentity:
        """Return the verified identity behind ``quote`` or raise the specific failure.

        ``now`` is the verifier's clock in seconds (passed in: this module does no I/O).
        """
        parsed = quote if isinstance(quote, Quote) else Quote.decode(quote)
        if log is not None:
            log.ok("format", "quote, body and certificate parse canonically")

        certificate, attestation_key = self._certificate(parsed.certificate)
        if log is not None:
            log.ok("certificate", f"platform {certificate.platform_id!r} certified by vendor root")

        try:
            attestation_key.verify(parsed.signed_body, parsed.signature)
        except BadSignatureError as exc:
            raise BadSignature(
                f"quote is not signed by platform {certificate.platform_id!r}'s attestation key"
            ) from exc
        if log is not None:
            log.ok("signature", "quote body signed by the certified attestation key")

        body = parsed.body
        if body.platform_id != certificate.platform_id or body.tcb_status != certificate.tcb_status:
            raise CertificateMismatch(
                f"quote claims platform {body.platform_id!r}/{body.tcb_status.value}, "
                f"certificate states {certificate.platform_id!r}/{certificate.tcb_status.value}"
            )

        for check, passed, refusal in policy.judge(
            body.platform_id, body.tcb_status, body.identity, role
        ):
            if refusal is not None:
                raise refusal
            if log is not None:
                log.ok(check, passed)

        age = now - body.timestamp_ms / 1000.0
        if age > policy.max_quote_age_s:
            raise StaleQuote(f"quote is {age:.1f}s old; maximum is {policy.max_quote_age_s:g}s")
        if age < -policy.max_clock_skew_s:
            raise StaleQuote(f"quote is dated {-age:.1f}s in the future")
        if log is not None:
            log.ok(
                "freshness", f"quote is {max(age, 0.0):.1f}s old (max {policy.max_quote_age_s:g}s)"
            )

        if not hmac.compare_digest(body.report_data, expected_report_data):
            raise ReportDataMismatch("quote report data does not bind the expected value")
        if log is not None:
            log.ok("report data", "binds the expected value")

        return VerifiedIdentity(
            role=role,
            identity=body.identity,
            platform_id=body.platform_id,
            tcb_status=body.tcb_status,
            timestamp_ms=body.timestamp_ms,
            report_data=body.report_data,
        )


def verify(
    quote: bytes | Quote,
    policy: Policy,
    expected_report_data: bytes,
    *,
    vendor_root: bytes,
    role: EnclaveRole,
    now: float,
) -> VerifiedIdentity:
    """One-shot verification without a certificate cache (see :class:`QuoteVerifier`)."""
    return QuoteVerifier(vendor_root).verify(
        quote, policy, expected_report_data, role=role, now=now
    )


__all__ = [
    "REPORT_DATA_SIZE",
    "CheckLog",
    "MalformedEvidence",
    "Quote",
    "QuoteBody",
    "QuoteVerifier",
    "VerifiedIdentity",
    "report_data_for",
    "verify",
]
