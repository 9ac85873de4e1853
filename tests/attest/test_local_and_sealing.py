"""Local attestation proves co-location; sealing binds state to platform and measurement."""

from __future__ import annotations

import dataclasses

import pytest
from nacl.public import PrivateKey

from attest import errors, local
from attest.sealing import seal, unseal

from .conftest import KM, SERVICE, SERVICE_CODE, World, identity


def attest_locally(world: World, km_platform: str, service_platform: str, service=SERVICE):  # type: ignore[no-untyped-def]
    km = world.km(km_platform)
    service_ctx = world.platforms[service_platform].enclave(service)
    challenge = local.new_challenge()
    public_key = bytes(PrivateKey.generate().public_key)
    response = local.respond(service_ctx, km.identity.measurement, challenge, public_key)
    return km, challenge, response, public_key


def test_service_enclave_on_same_platform_is_attested(world: World) -> None:
    km, challenge, response, public_key = attest_locally(world, "a", "a")
    result = local.verify_response(km, challenge, response, world.policy)
    assert result.identity == SERVICE
    assert result.public_key == public_key


def test_report_from_another_platform_is_rejected(world: World) -> None:
    km, challenge, response, _ = attest_locally(world, "a", "b")
    with pytest.raises(errors.ReportNotFromThisPlatform):
        local.verify_response(km, challenge, response, world.policy)


def test_report_for_another_target_enclave_is_rejected(world: World) -> None:
    km = world.km("a")
    service_ctx = world.platforms["a"].enclave(SERVICE)
    challenge = local.new_challenge()
    response = local.respond(service_ctx, SERVICE.measurement, challenge, b"k" * 32)
    with pytest.raises(errors.ReportNotFromThisPlatform):
        local.verify_response(km, challenge, response, world.policy)


def test_service_with_unknown_measurement_is_rejected(world: World) -> None:
    rogue = identity({**SERVICE_CODE, "service/enclave.py": b"leak()\n"})
    km, challenge, response, _ = attest_locally(world, "a", "a", rogue)
    with pytest.raises(errors.UnknownMeasurement):
        local.verify_response(km, challenge, response, world.policy)


def test_service_with_old_security_version_is_rejected(world: World) -> None:
    km, challenge, response, _ = attest_locally(
        world, "a", "a", dataclasses.replace(SERVICE, svn=1)
    )
    with pytest.raises(errors.SecurityVersionTooLow):
        local.verify_response(km, challenge, response, world.policy)


def test_response_to_an_old_challenge_is_rejected(world: World) -> None:
    km, _, response, _ = attest_locally(world, "a", "a")
    with pytest.raises(errors.ChallengeMismatch):
        local.verify_response(km, local.new_challenge(), response, world.policy)


def test_swapped_public_key_is_rejected(world: World) -> None:
    km, challenge, response, _ = attest_locally(world, "a", "a")
    report, _ = local.wire.unpack(response, b"KMLA", 2, "response")
    swapped = local.wire.pack(b"KMLA", report, bytes(PrivateKey.generate().public_key))
    with pytest.raises(errors.ChallengeMismatch):
        local.verify_response(km, challenge, swapped, world.policy)


def test_seal_round_trip(world: World) -> None:
    enclave = world.km("a")
    blob = seal(enclave, b"master secret")
    assert b"master secret" not in blob
    assert unseal(world.km("a"), blob) == b"master secret"


def test_unseal_on_another_platform_fails(world: World) -> None:
    blob = seal(world.km("a"), b"state")
    with pytest.raises(errors.SealedOnOtherPlatform):
        unseal(world.km("b"), blob)


def test_unseal_by_another_measurement_fails(world: World) -> None:
    blob = seal(world.km("a"), b"state")
    with pytest.raises(errors.SealedByOtherEnclave):
        unseal(world.km("a", SERVICE), blob)


def test_unseal_with_forged_header_fails_authentication(world: World) -> None:
    """Rewriting the header to name the opener still cannot open the blob: the key differs."""
    blob = seal(world.km("a"), b"state")
    _, nonce, ciphertext = local.wire.unpack(blob, b"KMSL", 3, "blob")
    forged_header = local.wire.pack(b"KMSH", b"b", KM.measurement)
    forged = local.wire.pack(b"KMSL", forged_header, nonce, ciphertext)
    with pytest.raises(errors.SealedDataCorrupt):
        unseal(world.km("b"), forged)


def test_tampered_sealed_blob_fails(world: World) -> None:
    blob = bytearray(seal(world.km("a"), b"state"))
    blob[-3] ^= 0x80
    with pytest.raises(errors.SealedDataCorrupt):
        unseal(world.km("a"), bytes(blob))
