"""Simulated TEE hardware: a vendor root, platforms, and the interface an enclave gets.

No real SGX is available, so the hardware is modelled with real cryptography:

* the vendor root (Ed25519) certifies each platform's attestation key, like Intel's PCK CA;
* a platform signs quotes with its attestation key, MACs local reports with a report key only
  enclaves on that platform can derive (EREPORT/EGETKEY), and derives sealing keys from a secret
  and the enclave's measurement;
* an enclave never holds these secrets: it gets an :class:`EnclaveContext` bound to its own
  identity, and can only ask for quotes about itself, reports about itself, its own report key
  (to check reports targeted at it), and its own sealing key.

Objects here hold simulated fused secrets; their ``repr`` never shows them.
"""

from __future__ import annotations

import hashlib

from nacl.signing import SigningKey

from attest import wire
from attest.certs import PlatformCertificate, TcbStatus
from attest.identity import EnclaveIdentity
from attest.local import LocalReportBody
from attest.quote import REPORT_DATA_SIZE, Quote, QuoteBody

SEED_SIZE = 32


def _derive(secret: bytes, label: bytes, context: bytes = b"") -> bytes:
    """Domain-separated key derivation from a simulated fused secret."""
    return hashlib.blake2b(label + b"\0" + context, key=secret, digest_size=32).digest()


class VendorRoot:
    """The hardware vendor's root of trust; its public key is every verifier's trust anchor."""

    __slots__ = ("_signing_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError("vendor root seed must be 32 bytes")
        self._signing_key = SigningKey(_derive(seed, b"vendor-root"))

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    def certify(
        self, platform_id: str, tcb_status: TcbStatus, attestation_key: bytes
    ) -> PlatformCertificate:
        body = PlatformCertificate.signed_body(platform_id, tcb_status, attestation_key)
        return PlatformCertificate(
            platform_id=platform_id,
            tcb_status=tcb_status,
            attestation_key=attestation_key,
            vendor_signature=self._signing_key.sign(body).signature,
        )

    def __repr__(self) -> str:
        return f"VendorRoot(public_key={self.public_key.hex()[:16]}…)"


class Platform:
    """One simulated machine with a TEE: its fused secrets and its vendor certificate."""

    __slots__ = ("_attestation_key", "_report_secret", "_seal_secret", "certificate")

    def __init__(
        self, platform_id: str, tcb_status: TcbStatus, seed: bytes, vendor: VendorRoot
    ) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError("platform seed must be 32 bytes")
        wire.text(platform_id.encode("utf-8"), "platform id")
        self._attestation_key = SigningKey(_derive(seed, b"attestation"))
        self._report_secret = _derive(seed, b"report")
        self._seal_secret = _derive(seed, b"seal")
        self.certificate = vendor.certify(
            platform_id, tcb_status, bytes(self._attestation_key.verify_key)
        )

    @property
    def platform_id(self) -> str:
        return self.certificate.platform_id

    @property
    def tcb_status(self) -> TcbStatus:
        return self.certificate.tcb_status

    def enclave(self, identity: EnclaveIdentity) -> EnclaveContext:
        """Load an enclave with ``identity`` on this platform (the hardware measures it)."""
        return EnclaveContext(self, identity)

    def _sign_quote(self, identity: EnclaveIdentity, report_data: bytes, now: float) -> bytes:
        body = QuoteBody(
            identity=identity,
            platform_id=self.platform_id,
            tcb_status=self.tcb_status,
            timestamp_ms=int(now * 1000),
            report_data=wire.fixed(report_data, REPORT_DATA_SIZE, "report data"),
        )
        signed_body = body.encode()
        return Quote(
            body=body,
            signed_body=signed_body,
            signature=self._attestation_key.sign(signed_body).signature,
            certificate=self.certificate.encode(),
        ).encode()

    def _report_key(self, target_measurement: bytes) -> bytes:
        return _derive(self._report_secret, b"report-key", target_measurement)

    def _seal_key(self, identity: EnclaveIdentity) -> bytes:
        return _derive(self._seal_secret, b"seal-key", identity.measurement)

    def _signer_seal_key(self, identity: EnclaveIdentity) -> bytes:
        product = identity.product_id.to_bytes(2, "big")
        return _derive(self._seal_secret, b"seal-key-signer", identity.signer + product)

    def __repr__(self) -> str:
        return f"Platform({self.platform_id!r}, {self.tcb_status.value})"


class EnclaveContext:
    """What the hardware offers to code running inside one enclave (EREPORT, EGETKEY, quoting).

    Every method is bound to this enclave's own identity: an enclave cannot obtain a quote,
    report or key for a measurement other than its own.
    """

    __slots__ = ("_platform", "identity")

    def __init__(self, platform: Platform, identity: EnclaveIdentity) -> None:
        self._platform = platform
        self.identity = identity

    @property
    def platform_id(self) -> str:
        return self._platform.platform_id

    def quote(self, report_data: bytes, now: float) -> bytes:
        """A quote about this enclave, binding ``report_data``, stamped with ``now`` (seconds)."""
        return self._platform._sign_quote(self.identity, report_data, now)

    def report(self, target_measurement: bytes, report_data: bytes) -> bytes:
        """A local report about this enclave for ``target_measurement`` (EREPORT).

        Only an enclave with the target measurement on this same platform can check the MAC.
        """
        body = LocalReportBody(self.identity, target_measurement, report_data)
        return body.seal_with(self._platform._report_key(target_measurement))

    def own_report_key(self) -> bytes:
        """The key that authenticates reports addressed to this enclave (EGETKEY REPORT_KEY)."""
        return self._platform._report_key(self.identity.measurement)

    def seal_key(self) -> bytes:
        """The key only this measurement on this platform derives (EGETKEY SEAL_KEY, MRENCLAVE)."""
        return self._platform._seal_key(self.identity)

    def signer_seal_key(self) -> bytes:
        """The key every build of this signer and product derives on this platform (EGETKEY
        SEAL_KEY with the MRSIGNER policy): for what a later build must still read, never for
        secrets (a new build is trusted with those only once governance allows it)."""
        return self._platform._signer_seal_key(self.identity)

    def __repr__(self) -> str:
        return (
            f"EnclaveContext(platform={self.platform_id!r}, "
            f"measurement={self.identity.measurement.hex()[:16]}…)"
        )
