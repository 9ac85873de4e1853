"""The attestation policy: which enclaves, on which platforms, the cluster trusts.

The policy is data, replicated through consensus, so every KM enclave judges a peer by the same
rules at the same log position. It is immutable: a change produces a new policy (which is what a
committed policy entry installs), so a verification in progress never sees half an update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from attest.certs import TcbStatus
from attest.errors import (
    AttestationError,
    RevokedPlatform,
    SecurityVersionTooLow,
    TcbNotAccepted,
    UnknownMeasurement,
)
from attest.identity import MEASUREMENT_SIZE, EnclaveIdentity, EnclaveRole


def _measurement_set(values: Iterable[bytes]) -> frozenset[bytes]:
    result = frozenset(values)
    for value in result:
        if len(value) != MEASUREMENT_SIZE:
            raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes, got {len(value)}")
    return result


@dataclass(frozen=True, slots=True)
class Policy:
    km_measurements: frozenset[bytes] = frozenset()
    service_measurements: frozenset[bytes] = frozenset()
    min_svn: int = 0
    accepted_tcb: frozenset[TcbStatus] = frozenset({TcbStatus.UP_TO_DATE})
    revoked_platforms: frozenset[str] = frozenset()
    max_quote_age_s: float = 60.0
    #: Quotes dated this far ahead of the verifier's clock are still accepted (clock skew).
    max_clock_skew_s: float = field(default=5.0)

    def __post_init__(self) -> None:
        _measurement_set(self.km_measurements)
        _measurement_set(self.service_measurements)
        if self.min_svn < 0:
            raise ValueError("min_svn must be >= 0")
        if self.max_quote_age_s <= 0 or self.max_clock_skew_s < 0:
            raise ValueError("max_quote_age_s must be > 0 and max_clock_skew_s >= 0")

    def judge(
        self, platform_id: str, tcb_status: TcbStatus, identity: EnclaveIdentity, role: EnclaveRole
    ) -> list[tuple[str, str, AttestationError | None]]:
        """The policy's rules for an enclave a quote showed, in order: (check, what passing
        means, the refusal if it fails). One place for the rules, so a quote checked at a
        handshake and a session judged again after a policy change meet the same ones."""
        accepted = ", ".join(sorted(s.value for s in self.accepted_tcb)) or "none"
        measurement, svn = identity.measurement, identity.svn
        return [
            (
                "platform",
                f"{platform_id!r} is not revoked",
                RevokedPlatform(f"platform {platform_id!r} is revoked by policy")
                if platform_id in self.revoked_platforms
                else None,
            ),
            (
                "tcb",
                f"TCB status {tcb_status.value} accepted",
                TcbNotAccepted(
                    f"platform {platform_id!r} TCB status {tcb_status.value} is not accepted "
                    f"(accepted: {accepted})"
                )
                if tcb_status not in self.accepted_tcb
                else None,
            ),
            (
                "measurement",
                f"{measurement.hex()[:16]}… allowed for {role.value}",
                UnknownMeasurement(
                    f"measurement {measurement.hex()} is not allowed for role {role.value}"
                )
                if measurement not in self.measurements_for(role)
                else None,
            ),
            (
                "svn",
                f"security version {svn} >= {self.min_svn}",
                SecurityVersionTooLow(f"security version {svn} is below the minimum {self.min_svn}")
                if svn < self.min_svn
                else None,
            ),
        ]

    def measurements_for(self, role: EnclaveRole) -> frozenset[bytes]:
        return self.km_measurements if role is EnclaveRole.KM else self.service_measurements

    def allow(self, role: EnclaveRole, measurement: bytes) -> Policy:
        return self._with_measurements(role, self.measurements_for(role) | {measurement})

    def disallow(self, role: EnclaveRole, measurement: bytes) -> Policy:
        return self._with_measurements(role, self.measurements_for(role) - {measurement})

    def revoke_platform(self, platform_id: str) -> Policy:
        return replace(self, revoked_platforms=self.revoked_platforms | {platform_id})

    def _with_measurements(self, role: EnclaveRole, values: frozenset[bytes]) -> Policy:
        values = _measurement_set(values)
        if role is EnclaveRole.KM:
            return replace(self, km_measurements=values)
        return replace(self, service_measurements=values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form with sorted lists, so equal policies encode identically."""
        return {
            "measurements": {
                EnclaveRole.KM.value: sorted(m.hex() for m in self.km_measurements),
                EnclaveRole.SERVICE.value: sorted(m.hex() for m in self.service_measurements),
            },
            "min_svn": self.min_svn,
            "accepted_tcb": sorted(s.value for s in self.accepted_tcb),
            "revoked_platforms": sorted(self.revoked_platforms),
            "max_quote_age_s": self.max_quote_age_s,
            "max_clock_skew_s": self.max_clock_skew_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        measurements = data.get("measurements", {})
        return cls(
            km_measurements=frozenset(
                bytes.fromhex(m) for m in measurements.get(EnclaveRole.KM.value, [])
            ),
            service_measurements=frozenset(
                bytes.fromhex(m) for m in measurements.get(EnclaveRole.SERVICE.value, [])
            ),
            min_svn=int(data.get("min_svn", 0)),
            accepted_tcb=frozenset(TcbStatus(s) for s in data.get("accepted_tcb", [])),
            revoked_platforms=frozenset(str(p) for p in data.get("revoked_platforms", [])),
            max_quote_age_s=float(data.get("max_quote_age_s", 60.0)),
            max_clock_skew_s=float(data.get("max_clock_skew_s", 5.0)),
        )
