"""A small simulated world for attestation tests: one vendor, three platforms, two enclaves."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attest.certs import TcbStatus
from attest.handshake import HandshakeConfig
from attest.hardware import EnclaveContext, Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier

NOW = 1_800_000_000.0

KM_CODE = {"km/enclave.py": b"def run(): return 'km'\n"}
SERVICE_CODE = {"service/enclave.py": b"def run(): return 'service'\n"}


def identity(code: dict[str, bytes], svn: int = 2) -> EnclaveIdentity:
    return EnclaveIdentity(measure_sources(code), signer_id("kmsim-tests"), product_id=1, svn=svn)


KM = identity(KM_CODE)
SERVICE = identity(SERVICE_CODE)


def seed(label: str) -> bytes:
    return label.encode().ljust(32, b"\0")


@dataclass
class World:
    vendor: VendorRoot
    platforms: dict[str, Platform]
    policy: Policy
    verifier: QuoteVerifier

    def km(self, platform: str, ident: EnclaveIdentity = KM) -> EnclaveContext:
        return self.platforms[platform].enclave(ident)

    def directory(self) -> dict[str, str]:
        return {f"node-{p}": p for p in self.platforms}

    def hs_config(self, platform: str, **overrides: object) -> HandshakeConfig:
        fields: dict[str, object] = {
            "name": f"node-{platform}",
            "enclave": self.km(platform),
            "verifier": self.verifier,
            "directory": self.directory(),
        }
        fields.update(overrides)
        return HandshakeConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def world() -> World:
    vendor = VendorRoot(seed("vendor"))
    platforms = {
        name: Platform(name, TcbStatus.UP_TO_DATE, seed(name), vendor) for name in ("a", "b", "c")
    }
    policy = Policy(
        km_measurements=frozenset({KM.measurement}),
        service_measurements=frozenset({SERVICE.measurement}),
        min_svn=2,
        accepted_tcb=frozenset({TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED}),
        max_quote_age_s=60.0,
    )
    return World(vendor, platforms, policy, QuoteVerifier(vendor.public_key))
