"""Quote verification: every accepted field is checked, every failure is specific."""

from __future__ import annotations

import dataclasses

import pytest
from nacl.signing import SigningKey

from attest import errors
from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveRole
from attest.quote import CheckLog, Quote, QuoteVerifier, report_data_for, verify

from .conftest import KM, KM_CODE, NOW, SERVICE, World, identity, seed

RD = report_data_for(b"test", b"binding")


def check(world: World, quote: bytes, *, now: float = NOW, rd: bytes = RD) -> object:
    return world.verifier.verify(quote, world.policy, rd, role=EnclaveRole.KM, now=now)


def test_genuine_quote_verifies_and_reports_identity(world: World) -> None:
    log = CheckLog()
    verified = world.verifier.verify(
        world.km("a").quote(RD, NOW), world.policy, RD, role=EnclaveRole.KM, now=NOW + 1, log=log
    )
    assert verified.platform_id == "a"
    assert verified.identity == KM
    assert verified.tcb_status is TcbStatus.UP_TO_DATE
    assert [name for name, _ in log.passed] == [
        "format", "certificate", "signature", "platform", "tcb",
        "measurement", "svn", "freshness", "report data",
    ]  # fmt: skip


def test_one_shot_verify_matches_cached_verifier(world: World) -> None:
    quote = world.km("b").quote(RD, NOW)
    one_shot = verify(
        quote, world.policy, RD, vendor_root=world.vendor.public_key, role=EnclaveRole.KM, now=NOW
    )
    assert one_shot == check(world, quote)


def test_forged_signature_is_rejected(world: World) -> None:
    genuine = Quote.decode(world.km("a").quote(RD, NOW))
    forged_body = dataclasses.replace(genuine.body, identity=dataclasses.replace(KM, svn=9))
    forged = dataclasses.replace(genuine, signed_body=forged_body.encode())
    with pytest.raises(errors.BadSignature):
        check(world, forged.encode())


def test_quote_signed_by_attacker_key_is_rejected(world: World) -> None:
    genuine = Quote.decode(world.km("a").quote(RD, NOW))
    attacker = SigningKey(seed("attacker"))
    forged = dataclasses.replace(genuine, signature=attacker.sign(genuine.signed_body).signature)
    with pytest.raises(errors.BadSignature):
        check(world, forged.encode())


def test_certificate_not_from_vendor_root_is_rejected(world: World) -> None:
    rogue_vendor = VendorRoot(seed("rogue-vendor"))
    rogue = Platform("a", TcbStatus.UP_TO_DATE, seed("a"), rogue_vendor)
    with pytest.raises(errors.UntrustedCertificate):
        check(world, rogue.enclave(KM).quote(RD, NOW))


def test_quote_claiming_other_platform_than_its_certificate_is_rejected(world: World) -> None:
    platform_a = world.platforms["a"]
    genuine = Quote.decode(platform_a.enclave(KM).quote(RD, NOW))
    body = dataclasses.replace(genuine.body, platform_id="b").encode()
    signed = dataclasses.replace(
        genuine, signed_body=body, signature=platform_a._attestation_key.sign(body).signature
    )
    with pytest.raises(errors.CertificateMismatch):
        check(world, signed.encode())


def test_unknown_measurement_is_rejected(world: World) -> None:
    modified = identity({**KM_CODE, "km/enclave.py": b"def run(): return 'evil'\n"})
    with pytest.raises(errors.UnknownMeasurement):
        check(world, world.km("a", modified).quote(RD, NOW))


def test_measurement_allowed_for_another_role_only_is_rejected(world: World) -> None:
    with pytest.raises(errors.UnknownMeasurement):
        check(world, world.km("a", SERVICE).quote(RD, NOW))


def test_security_version_below_minimum_is_rejected(world: World) -> None:
    old = dataclasses.replace(KM, svn=1)
    with pytest.raises(errors.SecurityVersionTooLow):
        check(world, world.km("a", old).quote(RD, NOW))


def test_tcb_status_not_accepted_is_rejected(world: World) -> None:
    outdated = Platform("d", TcbStatus.OUT_OF_DATE, seed("d"), world.vendor)
    with pytest.raises(errors.TcbNotAccepted, match="out_of_date"):
        check(world, outdated.enclave(KM).quote(RD, NOW))


def test_revoked_platform_is_rejected(world: World) -> None:
    world.policy = world.policy.revoke_platform("a")
    with pytest.raises(errors.RevokedPlatform):
        check(world, world.km("a").quote(RD, NOW))
    check(world, world.km("b").quote(RD, NOW))


def test_stale_quote_is_rejected(world: World) -> None:
    quote = world.km("a").quote(RD, NOW)
    check(world, quote, now=NOW + 59)
    with pytest.raises(errors.StaleQuote, match="old"):
        check(world, quote, now=NOW + 61)


def test_quote_from_the_future_is_rejected(world: World) -> None:
    with pytest.raises(errors.StaleQuote, match="future"):
        check(world, world.km("a").quote(RD, NOW + 30), now=NOW)


def test_wrong_report_data_binding_is_rejected(world: World) -> None:
    quote = world.km("a").quote(RD, NOW)
    with pytest.raises(errors.ReportDataMismatch):
        check(world, quote, rd=report_data_for(b"test", b"another binding"))


def test_truncated_and_garbage_quotes_are_malformed(world: World) -> None:
    quote = world.km("a").quote(RD, NOW)
    for bad in (b"", quote[:-1], quote + b"\0", b"KMQ1" + bytes(100)):
        with pytest.raises(errors.MalformedEvidence):
            check(world, bad)


def test_certificate_cache_does_not_accept_a_forged_certificate_later(world: World) -> None:
    check(world, world.km("a").quote(RD, NOW))
    rogue = Platform("a", TcbStatus.UP_TO_DATE, seed("other"), VendorRoot(seed("rogue")))
    with pytest.raises(errors.UntrustedCertificate):
        check(world, rogue.enclave(KM).quote(RD, NOW))


def test_verifier_cache_is_bounded(world: World) -> None:
    verifier = QuoteVerifier(world.vendor.public_key, cache_size=2)
    for name in "abc":
        verifier.verify(
            world.km(name).quote(RD, NOW), world.policy, RD, role=EnclaveRole.KM, now=NOW
        )
    assert len(verifier._cache) == 2
