"""KM enclave to service enclave: keys only reach attested code, and all nodes agree on them."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from attest import local
from attest.errors import AttestationError, SealingError, UnknownMeasurement
from attest.keybox import KeyBoxes
from consensus.types import Message, MessageType
from kmnode.km.enclave import (
    EnclaveStateError,
    FrameRefused,
    KMEnclave,
    ProvisionResult,
    Purpose,
    SessionRefused,
    derive_key,
)
from kmnode.service.enclave import ProvisioningError, ServiceEnclave, proof_key
from tests.km.enclaves import (
    KM_ID,
    PLATFORMS,
    ROGUE_ID,
    SVC_ID,
    bare_enclave,
    commit,
    handshake,
    join,
    joined_pair,
    km_node,
    release,
    service,
)


def provision(km: KMEnclave, svc: ServiceEnclave, release_id: str = "") -> ProvisionResult:
    challenge = km.new_challenge()
    response = svc.answer_challenge(km.identity.measurement, challenge)
    return km.provision(release_id or release(km), challenge, response)


def test_attested_service_receives_the_key_and_all_nodes_agree() -> None:
    a, b = joined_pair()
    challenge = b"test challenge"
    proofs = []
    for km, platform in ((a, "a"), (b, "b")):
        svc = service(platform)
        result = provision(km, svc)
        assert result.ok and result.service_measurement == SVC_ID.measurement.hex()
        assert svc.accept_key(result.ciphertext, result.vouch) == ("db", 1)
        proofs.append(svc.prove("db", 1, challenge))
    assert proofs[0] == proofs[1]
    assert a.key_fingerprint("db", 1) == b.key_fingerprint("db", 1)
    assert a.key_fingerprint("db", 1) != a.key_fingerprint("db", 2)


def test_the_key_and_generation_are_the_committed_releases() -> None:
    a, _ = joined_pair()
    commit(a, "key.rotate", key="db")
    svc = service("a")
    assert provision(a, svc, release(a, generation=1)).ok
    assert provision(a, svc, release(a)).ok
    assert svc.holds("db", 1) is False  # accepted only once handed over
    first = provision(a, svc, release(a, generation=1))
    assert svc.accept_key(first.ciphertext, first.vouch) == ("db", 1)
    latest = provision(a, svc, release(a))
    assert svc.accept_key(latest.ciphertext, latest.vouch) == ("db", 2)


def test_no_key_without_a_committed_release_for_this_node() -> None:
    a, _ = joined_pair()
    svc = service("a")
    assert "no committed release" in provision(a, svc, "r999").reason
    other = release(a, node="n-b")
    assert "is for n-b" in provision(a, svc, other).reason
    done = release(a)
    assert provision(a, svc, done).ok
    again = provision(a, svc, done)
    assert not again.ok and "already handled" in again.reason
    commit(a, "release.outcome", release=(later := release(a)), node="n-a", status="refused")
    assert "already handled" in provision(a, svc, later).reason


def test_service_with_wrong_measurement_gets_nothing() -> None:
    a, _ = joined_pair()
    result = provision(a, service("a", ROGUE_ID))
    assert not result.ok and result.ciphertext == b""
    assert result.reason.startswith("UnknownMeasurement")


def test_service_on_another_platform_gets_nothing() -> None:
    a, _ = joined_pair()
    result = provision(a, service("b"))
    assert not result.ok and result.reason.startswith("ReportNotFromThisPlatform")


def test_key_restricted_to_other_measurement_is_refused() -> None:
    a, _ = joined_pair()
    commit(a, "key.create", name="narrow", allowed_service=["cc" * 32])
    result = provision(a, service("a"), release(a, key="narrow"))
    assert not result.ok and "not allowed" in result.reason


def test_ciphertext_for_one_service_is_useless_to_another() -> None:
    a, _ = joined_pair()
    result = provision(a, service("a"))
    with pytest.raises(ProvisioningError):
        service("a").accept_key(result.ciphertext, result.vouch)


def test_sealed_state_restores_on_same_platform_and_node_only() -> None:
    a, _ = joined_pair()
    blob = a.sealed_state()
    restarted = km_node("n-a", "a")
    restarted.restore_sealed_state(blob)
    assert restarted.key_fingerprint("db", 1) == a.key_fingerprint("db", 1)
    with pytest.raises(SealingError, match="platform"):
        km_node("n-a", "b").restore_sealed_state(blob)
    with pytest.raises(SealingError, match="belongs to node 'n-a', not 'n-c'"):
        bare_enclave("n-c", "a").restore_sealed_state(blob)


def test_sealed_state_of_another_cluster_is_refused() -> None:
    """Two clusters with a node of the same name on the same platform: the blob of one is
    refused by the ledger of the other, and the enclave then keeps its secret to itself."""
    ours = km_node("n-a", "a", genesis=True)
    other = km_node("n-a", "a", genesis=True)
    blob = other.sealed_state()
    restored = km_node("n-a", "a", cluster_id=ours.cluster_id)
    restored.restore_sealed_state(blob)
    assert "another cluster" in restored.binding_error
    with pytest.raises(EnclaveStateError, match="refusing"):
        restored.key_fingerprint("db", 1)
    svc = service("a")
    with pytest.raises(EnclaveStateError, match="refusing"):
        provision(restored, svc)
    same = km_node("n-a", "a", cluster_id=other.cluster_id)
    same.restore_sealed_state(blob)
    assert same.binding_error == "" and same.key_fingerprint("db", 1)


def test_sealed_state_of_another_genesis_is_refused() -> None:
    first = km_node("n-a", "a", genesis=True)
    first.check_binding()  # learns the genesis hash of its ledger
    assert first.sealed_dirty
    blob = first.sealed_state()
    replayed = bare_enclave("n-a", "a")
    replayed.restore_sealed_state(blob)
    # A ledger with the same cluster id but another first entry (a forged history).
    commit(replayed, "cluster.init", cluster="forged", policy=replayed.state.policy.to_dict(),
           member={**{"name": "n-a", "platform_id": "a", "host": "h", "peer_port": 1,
                      "api_port": 2}})  # fmt: skip
    replayed.check_binding()
    assert "genesis" in replayed.binding_error


def test_no_master_secret_before_joining() -> None:
    lone = km_node("n-b", "b")
    with pytest.raises(EnclaveStateError):
        lone.key_fingerprint("db", 1)
    with pytest.raises(EnclaveStateError):
        provision(lone, service("b"))


def test_secrets_never_appear_in_repr() -> None:
    a, _ = joined_pair()
    secret = a._master_secret
    assert secret is not None
    for text in (repr(a), repr(service("a"))):
        assert secret.hex() not in text and repr(secret) not in text


def test_km_enclave_with_unknown_measurement_is_refused_by_members() -> None:
    a, _ = joined_pair()
    modified = KM_ID.__class__(
        local.new_challenge(), KM_ID.signer, KM_ID.product_id, KM_ID.svn
    )  # any other measurement
    rogue = KMEnclave("n-b", PLATFORMS["b"].enclave(modified), a.verifier, bootstrap={"n-a": "a"})
    rogue.state.policy = a.state.policy
    with pytest.raises(UnknownMeasurement):
        handshake(rogue, a, Purpose.RAFT)


def test_replayed_or_foreign_challenge_is_refused() -> None:
    a, _ = joined_pair()
    svc = service("a")
    challenge = a.new_challenge()
    response = svc.answer_challenge(KM_ID.measurement, challenge)
    assert a.provision(release(a), challenge, response).ok
    replay = a.provision(release(a), challenge, response)
    assert not replay.ok and "not issued" in replay.reason
    foreign = local.new_challenge()
    response = svc.answer_challenge(KM_ID.measurement, foreign)
    assert not a.provision(release(a), foreign, response).ok


def test_a_removed_member_loses_its_established_raft_links() -> None:
    a, b = joined_pair()
    dialled, accepted = handshake(a, b, Purpose.RAFT)
    heartbeat = Message(MessageType.HEARTBEAT, to="n-b", frm="n-a", term=1)
    assert b.open_raft(accepted, a.seal_raft(dialled, heartbeat)) == heartbeat
    frame = a.seal_raft(dialled, heartbeat)
    commit(b, "member.remove", name="n-a")  # committed on n-b: its link from n-a goes dead
    with pytest.raises(FrameRefused, match="no longer a member"):
        b.open_raft(accepted, frame)
    commit(a, "member.remove", name="n-b")  # and n-a stops sending to a removed n-b
    with pytest.raises(FrameRefused, match="no longer a member"):
        a.seal_raft(dialled, heartbeat)


def test_raft_messages_must_belong_to_their_link() -> None:
    a, b = joined_pair()
    dialled, accepted = handshake(a, b, Purpose.RAFT)
    forged = Message(MessageType.HEARTBEAT, to="n-b", frm="n-c", term=1)
    with pytest.raises(FrameRefused, match="does not belong"):
        a.seal_raft(dialled, forged)
    reply = Message(MessageType.HEARTBEAT, to="n-a", frm="n-b", term=1)
    with pytest.raises(SessionRefused, match="not dialled"):
        b.seal_raft(accepted, reply)  # links carry one direction: n-b sends on links it dials


def test_a_joiner_accepts_the_members_of_its_admission_until_it_has_caught_up() -> None:
    """A leader added late in the log is not in the first entries a joiner applies; the
    membership its admission named keeps that leader's links open until then."""
    a = km_node("n-a", "a", genesis=True)
    joiner = bare_enclave("n-c", "c")
    commit(a, "member.add", member={
        "name": "n-c", "platform_id": "c", "host": "h", "peer_port": 5, "api_port": 6,
    })  # fmt: skip
    assert join(joiner, a).status == "admitted"
    admitted_at = a.state.applied_index
    commit(joiner, "cluster.init", cluster="t", policy=a.state.policy.to_dict(),
           member={"name": "n-x", "platform_id": "x", "host": "h", "peer_port": 1,
                   "api_port": 2})  # fmt: skip
    assert joiner.state.applied_index < admitted_at
    assert joiner.directory() == {"n-x": "x", "n-a": "a", "n-b": "b"}
    restarted = bare_enclave("n-c", "c")
    restarted.restore_sealed_state(joiner.sealed_state())
    assert restarted.directory() == {"n-a": "a", "n-b": "b"}  # sealed with the secret
    for n in range(admitted_at):  # the joiner catches up
        if joiner.state.applied_index >= admitted_at:
            break
        commit(joiner, "key.create", name=f"k{n}")
    assert joiner.directory() == {"n-x": "x"}  # caught up: its own committed membership


def test_a_proof_is_never_a_mac_under_the_operational_key() -> None:
    """Whoever asks for proofs chooses the challenge; proofs are MACs under a key derived for
    proofs alone, so no challenge yields the operational key's MAC of the asker's bytes (with
    or without any prefix), and equal keys still give equal proofs."""
    a, _ = joined_pair()
    svc = service("a")
    result = provision(a, svc)
    assert svc.accept_key(result.ciphertext, result.vouch) == ("db", 1)
    key = derive_key(a._master_secret or b"", "db", 1)
    assert proof_key(key) != key
    for challenge in (b"c", b"transfer 100 to mallory", b"kmsim proof of possession\0c"):
        proof = svc.prove("db", 1, challenge)
        assert proof != hmac.new(key, challenge, hashlib.blake2b).hexdigest()
        assert proof == hmac.new(proof_key(key), challenge, hashlib.blake2b).hexdigest()


def _boxed(km: KMEnclave, svc: ServiceEnclave, envelope: dict[str, object]) -> bytes:
    """A key envelope boxed by ``km``'s own box key (what a compromised KM build could send)."""
    return km._boxes.seal(svc._boxes.public, json.dumps(envelope).encode())


def test_a_held_key_is_never_replaced_with_other_bytes() -> None:
    a, _ = joined_pair()
    svc = service("a")
    genuine = provision(a, svc)
    assert svc.accept_key(genuine.ciphertext, genuine.vouch) == ("db", 1)
    proof = svc.prove("db", 1, b"c")
    other = _boxed(a, svc, {"key": "db", "generation": 1, "material": "22" * 32})
    with pytest.raises(ProvisioningError, match="already held with other key material"):
        svc.accept_key(other, genuine.vouch)
    assert svc.prove("db", 1, b"c") == proof
    # The same bytes again (a second release of the same generation) are accepted.
    again = provision(a, svc, release(a, generation=1))
    assert svc.accept_key(again.ciphertext, again.vouch) == ("db", 1)
    assert svc.prove("db", 1, b"c") == proof


@pytest.mark.parametrize(
    "envelope",
    [
        {"key": "db", "generation": True, "material": "33" * 32},
        {"key": "db", "generation": 0, "material": "33" * 32},
        {"key": "db", "generation": 1.0, "material": "33" * 32},
        {"key": "db", "generation": 2**63, "material": "33" * 32},
        {"key": "../db", "generation": 1, "material": "33" * 32},
        {"key": "", "generation": 1, "material": "33" * 32},
        {"key": "db", "generation": 1, "material": "33" * 31},
        {"key": "db", "generation": 1, "material": "zz" * 32},
        {"key": "db", "generation": 1},
    ],
)
def test_a_malformed_envelope_is_refused_and_nothing_is_held(envelope: dict[str, object]) -> None:
    a, _ = joined_pair()
    svc = service("a")
    genuine = provision(a, svc)
    with pytest.raises(ProvisioningError, match=r"malformed|rejected"):
        svc.accept_key(_boxed(a, svc, envelope), genuine.vouch)
    assert svc._keys == {}
    assert not svc.holds("db", 1)


def test_keys_come_only_from_the_km_enclave_instance_attested_first() -> None:
    """A second genuine KM enclave on the same platform (say, started by the host from an
    older sealed state) vouches validly, yet the service takes keys from the first only."""
    a, _ = joined_pair()
    svc = service("a")
    first = provision(a, svc)
    assert svc.accept_key(first.ciphertext, first.vouch) == ("db", 1)
    second_km, _ = joined_pair()  # same build, same platform "a", another instance
    commit(second_km, "key.create", name="other")
    second = provision(second_km, svc, release(second_km, key="other"))
    assert second.ok
    with pytest.raises(ProvisioningError, match="another KM enclave instance"):
        svc.accept_key(second.ciphertext, second.vouch)
    assert not svc.holds("other", 1)


def test_a_service_takes_keys_only_from_a_km_enclave_that_vouched_for_the_box() -> None:
    """The host knows the service's box key too (it relays the report): a key it boxes itself,
    with or without a genuine vouch taken from another delivery, is refused, and the genuine
    key of that name and generation stays."""
    a, _ = joined_pair()
    svc = service("a")
    genuine = provision(a, svc)
    assert svc.accept_key(genuine.ciphertext, genuine.vouch) == ("db", 1)
    proof = svc.prove("db", 1, b"c")
    host = KeyBoxes()
    envelope = json.dumps({"key": "db", "generation": 1, "material": "11" * 32}).encode()
    forged = host.seal(svc._boxes.public, envelope)
    for vouch in (genuine.vouch, b"", b"\x00" * 200):
        with pytest.raises(ProvisioningError, match="rejected"):
            svc.accept_key(forged, vouch)
    assert svc.prove("db", 1, b"c") == proof


def test_a_vouch_from_another_platform_or_km_build_is_refused() -> None:
    a, _ = joined_pair()
    elsewhere = service("b")  # n-a's report cannot be checked on platform b
    result = provision(a, service("a"))
    with pytest.raises(ProvisioningError, match="ReportNotFromThisPlatform"):
        elsewhere.accept_key(result.ciphertext, result.vouch)
    distrustful = ServiceEnclave(PLATFORMS["a"].enclave(SVC_ID), trusted_km={b"\x01" * 32})
    result = provision(a, distrustful)
    with pytest.raises(ProvisioningError, match="UnknownMeasurement"):
        distrustful.accept_key(result.ciphertext, result.vouch)


def test_a_genesis_member_hears_a_joiner_before_its_first_entry_applies() -> None:
    """Nodes started together: a joiner may reach the genesis node before `cluster.init` has
    applied there. The join handshake completes (its join handler then answers "busy"), since
    refusing it as an unknown peer tells the joiner it will never be admitted, and it gives up;
    a Raft link from a non-member is still refused."""
    genesis = bare_enclave("n-a", "a")
    genesis.genesis()
    assert not genesis.state.cluster
    joiner = bare_enclave("n-b", "b")
    handshake(joiner, genesis, Purpose.JOIN)
    with pytest.raises(AttestationError, match="not a known member"):
        handshake(joiner, genesis, Purpose.RAFT)
