"""Local attestation between a node's KM enclave and its service enclave.

Remote quotes prove "genuine hardware somewhere"; before handing keys to a service enclave the
KM enclave must know that enclave runs on *this* platform with an allowed measurement. The
platform's report key gives exactly that: a report MACed for the KM enclave as target can only
have been produced by the same platform's hardware, so a good MAC proves co-location.

The exchange: the KM enclave issues a fresh challenge; the service enclave answers with a report
whose report data binds the challenge and the public key it wants its keys encrypted to; the KM
enclave checks MAC, measurement, security version and binding.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.utils

from attest import wire
from attest.errors import (
    ChallengeMismatch,
    ReportNotFromThisPlatform,
    SecurityVersionTooLow,
    UnknownMeasurement,
)
from attest.identity import MEASUREMENT_SIZE, EnclaveIdentity, EnclaveRole
from attest.policy import Policy
from attest.quote import REPORT_DATA_SIZE, report_data_for

if TYPE_CHECKING:
    from attest.hardware import EnclaveContext

_REPORT_TAG = b"KMLR"
_REPORT_BODY_TAG = b"KMLB"
_RESPONSE_TAG = b"KMLA"
_BINDING_LABEL = b"local-attestation"
_VOUCH_LABEL = b"km-provisioning-key"
CHALLENGE_SIZE = 32
PUBLIC_KEY_SIZE = 32


@dataclass(frozen=True, slots=True)
class LocalReportBody:
    identity: EnclaveIdentity
    target_measurement: bytes
    report_data: bytes

    def encode(self) -> bytes:
        return wire.pack(
            _REPORT_BODY_TAG,
            self.identity.measurement,
            self.identity.signer,
            wire.u16(self.identity.product_id),
            wire.u16(self.identity.svn),
            self.target_measurement,
            self.report_data,
        )

    def seal_with(self, report_key: bytes) -> bytes:
        """Encode and MAC the report (what the hardware does in EREPORT)."""
        body = self.encode()
        return wire.pack(_REPORT_TAG, body, _mac(report_key, body))

    @classmethod
    def decode(cls, data: bytes) -> LocalReportBody:
        fields = wire.unpack(data, _REPORT_BODY_TAG, 6, "local report body")
        measurement, signer, product, svn, target, report_data = fields
        return cls(
            identity=EnclaveIdentity(
                measurement=wire.fixed(measurement, MEASUREMENT_SIZE, "report measurement"),
                signer=wire.fixed(signer, MEASUREMENT_SIZE, "report signer"),
                product_id=wire.read_u16(product, "report product id"),
                svn=wire.read_u16(svn, "report svn"),
            ),
            target_measurement=wire.fixed(target, MEASUREMENT_SIZE, "report target"),
            report_data=wire.fixed(report_data, REPORT_DATA_SIZE, "report data"),
        )


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "blake2b")


def _open_report(target: EnclaveContext, report: bytes, role: str) -> LocalReportBody:
    """A report made for ``target`` on this platform (its MAC checked), decoded."""
    body_bytes, mac = wire.unpack(report, _REPORT_TAG, 2, "local report")
    if not hmac.compare_digest(_mac(target.own_report_key(), body_bytes), mac):
        raise ReportNotFromThisPlatform(
            f"report MAC does not verify with this platform's report key for this {role} "
            "enclave: it was produced on another platform, for another target, or altered"
        )
    return LocalReportBody.decode(body_bytes)


def new_challenge() -> bytes:
    """A fresh challenge for one local attestation (never reuse one)."""
    return nacl.utils.random(CHALLENGE_SIZE)


def respond(
    service: EnclaveContext, km_measurement: bytes, challenge: bytes, public_key: bytes
) -> bytes:
    """Service side: a report for the KM enclave binding ``challenge`` and ``public_key``."""
    wire.fixed(challenge, CHALLENGE_SIZE, "challenge")
    wire.fixed(public_key, PUBLIC_KEY_SIZE, "service public key")
    binding = report_data_for(_BINDING_LABEL, challenge, public_key)
    report = service.report(km_measurement, binding)
    return wire.pack(_RESPONSE_TAG, report, public_key)


@dataclass(frozen=True, slots=True)
class LocallyAttested:
    """A service enclave proven to run on this platform, and the key to provision it through."""

    identity: EnclaveIdentity
    public_key: bytes


def verify_response(
    km: EnclaveContext, challenge: bytes, response: bytes, policy: Policy
) -> LocallyAttested:
    """KM-enclave side: accept a service enclave's response or raise the specific failure."""
    report, public_key = wire.unpack(response, _RESPONSE_TAG, 2, "local attestation response")
    wire.fixed(public_key, PUBLIC_KEY_SIZE, "service public key")
    body = _open_report(km, report, "KM")
    if body.identity.measurement not in policy.measurements_for(EnclaveRole.SERVICE):
        raise UnknownMeasurement(
            f"service measurement {body.identity.measurement.hex()} is not allowed"
        )
    if body.identity.svn < policy.min_svn:
        raise SecurityVersionTooLow(
            f"service security version {body.identity.svn} is below the minimum {policy.min_svn}"
        )
    expected = report_data_for(_BINDING_LABEL, challenge, public_key)
    if not hmac.compare_digest(body.report_data, expected):
        raise ChallengeMismatch("report does not bind this challenge and key (stale or replayed)")
    return LocallyAttested(identity=body.identity, public_key=public_key)


def vouch(
    km: EnclaveContext, service_measurement: bytes, km_box_key: bytes, service_box_key: bytes
) -> bytes:
    """KM side: a report for the service enclave binding the box key its keys come from.

    Local attestation the other way round: only the hardware of this platform can MAC a report
    for the service's measurement, and it names the KM enclave's measurement, so the service
    can tell a key boxed by its node's KM enclave from one boxed by anybody else (the host).
    """
    wire.fixed(km_box_key, PUBLIC_KEY_SIZE, "KM box key")
    wire.fixed(service_box_key, PUBLIC_KEY_SIZE, "service box key")
    binding = report_data_for(_VOUCH_LABEL, km_box_key, service_box_key)
    return km.report(service_measurement, binding)


def verify_vouch(
    service: EnclaveContext,
    report: bytes,
    trusted_km: Collection[bytes],
    km_box_key: bytes,
    service_box_key: bytes,
) -> EnclaveIdentity:
    """Service side: accept a KM enclave's vouch for ``km_box_key`` or raise the failure."""
    body = _open_report(service, report, "service")
    if body.identity.measurement not in trusted_km:
        raise UnknownMeasurement(
            f"KM measurement {body.identity.measurement.hex()} is not the one this service trusts"
        )
    expected = report_data_for(_VOUCH_LABEL, km_box_key, service_box_key)
    if not hmac.compare_digest(body.report_data, expected):
        raise ChallengeMismatch("the vouch is for another box key (replayed or forged)")
    return body.identity
