"""Test helpers: KM enclaves on simulated platforms, driven only through their entry points."""

from __future__ import annotations

import dataclasses

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier
from kmnode.km.commands import Applied, ReleaseRequested
from kmnode.km.enclave import JoinReply, KMEnclave, Purpose
from kmnode.km.state import encode_command
from kmnode.service.enclave import ServiceEnclave

NOW = 1_800_000_000.0
KM_ID = EnclaveIdentity(measure_sources({"km": b"km"}), signer_id("t"), 1, 1)
SVC_ID = EnclaveIdentity(measure_sources({"svc": b"svc"}), signer_id("t"), 2, 1)
ROGUE_ID = dataclasses.replace(SVC_ID, measurement=measure_sources({"svc": b"rogue"}))
VENDOR = VendorRoot(b"v".ljust(32, b"\0"))
PLATFORMS = {
    n: Platform(n, TcbStatus.UP_TO_DATE, n.encode().ljust(32, b"\0"), VENDOR) for n in "abcx"
}
POLICY = Policy(
    km_measurements=frozenset({KM_ID.measurement}),
    service_measurements=frozenset({SVC_ID.measurement}),
    min_svn=1,
)
MEMBERS = [
    {"name": "n-a", "platform_id": "a", "host": "127.0.0.1", "peer_port": 1, "api_port": 2},
    {"name": "n-b", "platform_id": "b", "host": "127.0.0.1", "peer_port": 3, "api_port": 4},
]
BOOTSTRAP = {"n-a": "a", "n-b": "b", "n-c": "c"}


def bare_enclave(name: str, platform: str, identity: EnclaveIdentity = KM_ID) -> KMEnclave:
    """An enclave that belongs to no cluster yet (a joining node)."""
    enclave = KMEnclave(
        name, PLATFORMS[platform].enclave(identity), QuoteVerifier(VENDOR.public_key), BOOTSTRAP
    )
    enclave.state.policy = POLICY
    return enclave


def km_node(name: str, platform: str, cluster_id: str = "", genesis: bool = False) -> KMEnclave:
    """An enclave whose replicated state holds members n-a and n-b and a key ``db``; with
    ``genesis``, the enclave created the cluster (its master secret and cluster id)."""
    enclave = bare_enclave(name, platform)
    if genesis:
        enclave.genesis()
        cluster_id = enclave.cluster_id
    state = enclave.state
    init = {"cluster_id": cluster_id} if cluster_id else {}
    state.apply(
        1,
        encode_command(
            "cluster.init", cluster="t", policy=POLICY.to_dict(), member=MEMBERS[0], **init
        ),
    )
    state.apply(2, encode_command("member.add", member=MEMBERS[1]))
    state.apply(3, encode_command("key.create", name="db"))
    return enclave


def commit(km: KMEnclave, op: str, **fields: object) -> Applied:
    """Apply a command at the next index, as a committed entry would be."""
    return km.state.apply(km.state.applied_index + 1, encode_command(op, **fields))


def release(km: KMEnclave, key: str = "db", node: str = "", generation: int | None = None) -> str:
    """Commit a release of ``key`` to ``node`` (default: the enclave's own); its id."""
    fields: dict[str, object] = {"key": key, "node": node or km.name}
    if generation is not None:
        fields["generation"] = generation
    result = commit(km, "release.request", **fields)
    assert isinstance(result, ReleaseRequested), result
    return result.release


def handshake(dialler: KMEnclave, listener: KMEnclave, purpose: Purpose) -> tuple[int, int]:
    """Run a full handshake through the entry points; (dialler's session, listener's)."""
    initiator, hello = dialler.open_initiator(listener.name, purpose)
    responder = listener.open_responder(purpose)
    answer = listener.handshake_step(responder, hello, NOW)
    assert answer is not None
    finish = dialler.handshake_step(initiator, answer, NOW)
    assert finish is not None
    assert listener.handshake_step(responder, finish, NOW) is None
    return initiator, responder


def join(joiner: KMEnclave, member: KMEnclave, status: str = "admitted") -> JoinReply:
    """``joiner`` asks ``member`` to join; the member answers ``status``."""
    dialled, accepted = handshake(joiner, member, Purpose.JOIN)
    request = member.open_join_request(accepted, joiner.join_request(dialled, "127.0.0.1", 5, 6))
    assert request.name == joiner.name
    return joiner.open_join_reply(dialled, member.join_reply(accepted, JoinReply(status)))


def joined_pair() -> tuple[KMEnclave, KMEnclave]:
    """n-a creates the master secret; n-b receives it over an attested join channel."""
    a = km_node("n-a", "a", genesis=True)
    b = km_node("n-b", "b", cluster_id=a.cluster_id)
    assert join(b, a).status == "admitted"
    return a, b


def service(platform: str, identity: EnclaveIdentity = SVC_ID) -> ServiceEnclave:
    return ServiceEnclave(PLATFORMS[platform].enclave(identity), trusted_km={KM_ID.measurement})
