"""KM enclave to service enclave: keys only reach attested code, and all nodes agree on them."""

from __future__ import annotations

import dataclasses

import pytest

from attest import local
from attest.certs import TcbStatus
from attest.errors import SealingError, UnknownMeasurement
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier
from kmnode.km.enclave import EnclaveStateError, KMEnclave
from kmnode.km.state import encode_command
from kmnode.service.enclave import ProvisioningError, ServiceEnclave

NOW = 1_800_000_000.0
KM_ID = EnclaveIdentity(measure_sources({"km": b"km"}), signer_id("t"), 1, 1)
SVC_ID = EnclaveIdentity(measure_sources({"svc": b"svc"}), signer_id("t"), 2, 1)
ROGUE_ID = dataclasses.replace(SVC_ID, measurement=measure_sources({"svc": b"rogue"}))
VENDOR = VendorRoot(b"v".ljust(32, b"\0"))
PLATFORMS = {
    n: Platform(n, TcbStatus.UP_TO_DATE, n.encode().ljust(32, b"\0"), VENDOR) for n in "ab"
}
POLICY = Policy(
    km_measurements=frozenset({KM_ID.measurement}),
    service_measurements=frozenset({SVC_ID.measurement}),
    min_svn=1,
)


def km_node(name: str, platform: str) -> KMEnclave:
    enclave = KMEnclave(name, PLATFORMS[platform].enclave(KM_ID), QuoteVerifier(VENDOR.public_key))
    members = [
        {"name": "n-a", "platform_id": "a", "host": "127.0.0.1", "peer_port": 1, "api_port": 2},
        {"name": "n-b", "platform_id": "b", "host": "127.0.0.1", "peer_port": 3, "api_port": 4},
    ]
    state = enclave.state
    state.apply(
        1, encode_command("cluster.init", cluster="t", policy=POLICY.to_dict(), member=members[0])
    )
    state.apply(2, encode_command("member.add", member=members[1]))
    state.apply(3, encode_command("key.create", name="db"))
    return enclave


def provision(km: KMEnclave, service: ServiceEnclave, generation: int = 1):  # type: ignore[no-untyped-def]
    challenge = km.new_challenge()
    response = service.answer_challenge(km.context.identity.measurement, challenge)
    return km.provision("db", generation, challenge, response)


def joined_pair() -> tuple[KMEnclave, KMEnclave]:
    """n-a creates the master secret; n-b receives it over an attested channel."""
    a, b = km_node("n-a", "a"), km_node("n-b", "b")
    a.genesis()
    initiator, responder = b.initiator("n-a"), a.responder()
    answer = responder.receive(initiator.start(), NOW)
    assert answer is not None
    responder.receive(initiator.receive(answer, NOW), NOW)
    assert initiator.result and responder.result
    frame = a.export_master_secret(responder.result.channel)
    b.import_master_secret(initiator.result.channel, frame)
    return a, b


def test_attested_service_receives_the_key_and_all_nodes_agree() -> None:
    a, b = joined_pair()
    challenge = b"test challenge"
    proofs = []
    for km, platform in ((a, "a"), (b, "b")):
        service = ServiceEnclave(PLATFORMS[platform].enclave(SVC_ID))
        result = provision(km, service)
        assert result.ok and result.service_measurement == SVC_ID.measurement.hex()
        assert service.accept_key(result.ciphertext) == ("db", 1)
        proofs.append(service.prove("db", 1, challenge))
    assert proofs[0] == proofs[1]
    assert a.key_fingerprint("db", 1) == b.key_fingerprint("db", 1)
    assert a.key_fingerprint("db", 1) != a.key_fingerprint("db", 2)


def test_service_with_wrong_measurement_gets_nothing() -> None:
    a, _ = joined_pair()
    rogue = ServiceEnclave(PLATFORMS["a"].enclave(ROGUE_ID))
    result = provision(a, rogue)
    assert not result.ok and result.ciphertext == b""
    assert result.reason.startswith("UnknownMeasurement")


def test_service_on_another_platform_gets_nothing() -> None:
    a, _ = joined_pair()
    remote = ServiceEnclave(PLATFORMS["b"].enclave(SVC_ID))
    result = provision(a, remote)
    assert not result.ok and result.reason.startswith("ReportNotFromThisPlatform")


def test_key_restricted_to_other_measurement_is_refused() -> None:
    a, _ = joined_pair()
    a.state.apply(4, encode_command("key.create", name="narrow", allowed_service=["cc" * 32]))
    service = ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID))
    challenge = a.new_challenge()
    response = service.answer_challenge(KM_ID.measurement, challenge)
    result = a.provision("narrow", 1, challenge, response)
    assert not result.ok and "not allowed" in result.reason


def test_ciphertext_for_one_service_is_useless_to_another() -> None:
    a, _ = joined_pair()
    first = ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID))
    second = ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID))
    result = provision(a, first)
    with pytest.raises(ProvisioningError):
        second.accept_key(result.ciphertext)


def test_sealed_state_restores_on_same_platform_only() -> None:
    a, _ = joined_pair()
    blob = a.sealed_state()
    restarted = km_node("n-a", "a")
    restarted.restore_sealed_state(blob)
    assert restarted.key_fingerprint("db", 1) == a.key_fingerprint("db", 1)
    elsewhere = km_node("n-a", "b")
    with pytest.raises(SealingError):
        elsewhere.restore_sealed_state(blob)


def test_no_master_secret_before_joining() -> None:
    lone = km_node("n-b", "b")
    with pytest.raises(EnclaveStateError):
        lone.key_fingerprint("db", 1)
    service = ServiceEnclave(PLATFORMS["b"].enclave(SVC_ID))
    with pytest.raises(EnclaveStateError):
        provision(lone, service)


def test_secrets_never_appear_in_repr() -> None:
    a, _ = joined_pair()
    secret = a._master_secret
    assert secret is not None
    for text in (repr(a), repr(a.context), repr(ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID)))):
        assert secret.hex() not in text and repr(secret) not in text


def test_km_enclave_with_unknown_measurement_is_refused_by_members() -> None:
    a, _ = joined_pair()
    modified = dataclasses.replace(KM_ID, measurement=measure_sources({"km": b"patched"}))
    rogue = KMEnclave("n-b", PLATFORMS["b"].enclave(modified), QuoteVerifier(VENDOR.public_key))
    initiator = rogue.initiator("n-a", directory=a.directory())
    responder = a.responder()
    answer = responder.receive(initiator.start(), NOW)
    assert answer is not None
    with pytest.raises(UnknownMeasurement):
        responder.receive(initiator.receive(answer, NOW), NOW)
    assert responder.result is None


def test_replayed_or_foreign_challenge_is_refused() -> None:
    a, _ = joined_pair()
    service = ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID))
    challenge = a.new_challenge()
    response = service.answer_challenge(KM_ID.measurement, challenge)
    assert a.provision("db", 1, challenge, response).ok
    replay = a.provision("db", 1, challenge, response)
    assert not replay.ok and "not issued" in replay.reason
    foreign = local.new_challenge()
    response = service.answer_challenge(KM_ID.measurement, foreign)
    assert not a.provision("db", 1, foreign, response).ok
