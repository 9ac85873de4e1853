"""Data authorization inside the enclaves (issue 15): what the state machine refuses, what the
KM enclave boxes (and to whom), what the service enclave computes, and what it refuses,
driven as a hostile host would: wrong order, wrong node, replays, another build, a tampered
blob, parameters cut from another computation."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import statistics
from pathlib import Path
from typing import Any

import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import VerifyKey
from wasmtime import wat2wasm

from kmnode.contracts.envelope import seal_call
from kmnode.dataauth.blob import new_dek, seal_dataset
from kmnode.dataauth.ops import canonical_json, params_digest
from kmnode.identity import IdentityKeys
from kmnode.km.command_base import Applied, Refused
from kmnode.km.data_commands import TokenIssued
from kmnode.km.enclave import KMEnclave, ProvisionResult
from kmnode.km.state import KMState
from kmnode.service.data_jobs import DataJobs
from kmnode.service.enclave import ProvisioningError, ServiceEnclave
from kmnode.service_pipe import DataJobRequest, DataReleaseRequest, DataRevokeRequest
from tests.km.enclaves import NOW, ROGUE_ID, SVC_ID, commit, joined_pair, service

REPO = Path(__file__).resolve().parents[2]
OWNER, USER, OTHER, OPERATOR = (IdentityKeys.generate(n) for n in ("alice", "bob", "eve", "carol"))
CSV = ("v,w\n" + "".join(f"{i},{i % 3}\n" for i in range(1, 21))).encode()


class Ring:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def write(self, data: bytes, type: int = 0) -> bool:
        self.records.append(data)
        return True


class Setup:
    """Two joined KM enclaves with owner alice, users bob and eve, dataset ``d`` (its blob in
    ``blob_dir``) and both nodes' service measurements committed."""

    def __init__(self, blob_dir: Path) -> None:
        self.a, self.b = joined_pair()
        self.blob_dir = blob_dir
        self.requests = 0
        for km in (self.a, self.b):  # as cluster.yaml lists them at genesis
            km.state.identities = {
                k.name: k.public(roles)
                for k, roles in (
                    (OWNER, ["owner"]),
                    (USER, ["user"]),
                    (OTHER, ["user"]),
                    (OPERATOR, ["operator"]),
                )
            }
        for node in ("n-a", "n-b"):
            self.both("service.measured", node=node, measurement=SVC_ID.measurement.hex())
        self.digest = self.register("d", ["mean", "count"])

    def register(self, name: str, ops: list[str]) -> str:
        """Dataset ``name`` sealed and registered as its owner does; its blob's digest."""
        wrap = PublicKey(bytes.fromhex(self.a.data_public_keys()["wrap_key"]))
        dek = new_dek()
        sealed = seal_dataset(name, CSV, dek)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (self.blob_dir / sealed.digest_ct).write_bytes(sealed.ciphertext)
        wrapped = base64.b64encode(bytes(SealedBox(wrap).encrypt(dek))).decode()
        registered = self.signed(
            OWNER, "data.register", name=name, digest_ct=sealed.digest_ct,
            digest_pt=sealed.digest_pt, size=sealed.size, privacy="high", ops=ops,
            wrapped_key=wrapped,
        )  # fmt: skip
        assert registered.ok, registered
        return sealed.digest_ct

    def both(self, op: str, **fields: Any) -> Applied:
        first = commit(self.a, op, **fields)
        assert commit(self.b, op, **fields) == first
        return first

    def signed(self, keys: IdentityKeys, op: str, **fields: Any) -> Applied:
        self.requests += 1
        auth = {"by": keys.name, "request": f"{keys.name}:{self.requests}", "created": int(NOW)}
        return self.both(op, auth=auth, **fields)

    def compute(
        self, keys: IdentityKeys = USER, op: str = "mean", node: str = "n-a", **change: Any
    ) -> Applied:
        params = change.pop("params", {"column": "v"})
        digest = change.pop("digest", params_digest(params))
        nonce = change.pop("nonce", secrets.token_hex(16))
        input_key = self.a.contract_input_key()
        fields = {
            "dataset": "d",
            "operation": op,
            "params": digest,
            "sealed": seal_call(input_key, keys.name, nonce, canonical_json(params)),
            "nonce": nonce,
            "node": node,
            **change,
        }
        return self.signed(keys, "data.compute", **fields)


def job(km: KMEnclave, svc: ServiceEnclave, token: str) -> ProvisionResult:
    """One token provisioned as a batch of one: the box, or the token's refusal."""
    challenge = km.new_challenge()
    batch = km.provision_data_jobs(
        [token], challenge, svc.answer_challenge(km.identity.measurement, challenge)
    )
    if token in batch.refused:
        return ProvisionResult(False, batch.refused[token], "", b"")
    return batch.result


def run(jobs: DataJobs, result: Any) -> Any:
    """The service's end of a batch of one, and the ring records it wrote."""
    ring = Ring()
    reply = jobs.run(
        DataJobRequest(ciphertext=result.ciphertext.hex(), vouch=result.vouch.hex()), ring
    )
    (end,) = reply.ends
    return end, ring


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path / "blobs")


def test_a_granted_computation_gives_a_result_only_the_user_opens(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=2, ttl=600)
    issued = s.compute()
    assert isinstance(issued, TokenIssued) and issued.uses_left == 1
    svc = service("a")
    jobs = DataJobs(svc, s.blob_dir)
    reply, ring = run(jobs, job(s.a, svc, issued.token))
    assert reply.status == "consumed", reply
    # Nothing leaves through the ring until the ledger holds the end; then it leaves once.
    assert ring.records == []
    assert jobs.release(DataReleaseRequest(tokens=["t424242"]), ring).released == 0
    assert jobs.release(DataReleaseRequest(tokens=[issued.token]), ring).released == 1
    assert jobs.release(DataReleaseRequest(tokens=[issued.token]), ring).released == 0
    sealed = base64.b64decode(reply.sealed)
    assert hashlib.sha256(sealed).hexdigest() == reply.result_hash
    value = json.loads(SealedBox(PrivateKey(USER.box_secret)).decrypt(sealed))["value"]
    assert value == pytest.approx(10.5)
    for keys in (OWNER, OTHER):
        with pytest.raises(CryptoError):
            SealedBox(PrivateKey(keys.box_secret)).decrypt(sealed)
    record = json.loads(ring.records[0])
    assert record["user"] == "bob" and record["result_hash"] == reply.result_hash
    assert b"10.5" not in ring.records[0]


def test_every_node_derives_the_same_token_and_signature(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=1, ttl=600)
    token = s.compute()
    assert isinstance(token, TokenIssued)
    signed = [km.token_signature(token.token) for km in (s.a, s.b)]
    assert signed[0] == signed[1]
    body, signature = signed[0]
    VerifyKey(bytes.fromhex(s.b.data_public_keys()["token_key"])).verify(
        body, bytes.fromhex(signature)
    )
    assert json.loads(body)["platform"] == {"node": "n-a", "measurement": SVC_ID.measurement.hex()}


@pytest.mark.parametrize(
    ("setup", "keys", "op", "reason"),
    [
        (None, USER, "mean", "holds no grant"),
        ({"ops": ["count"]}, USER, "mean", "covers count, not mean"),
        ({"ops": ["mean"]}, OTHER, "mean", "'eve' holds no grant"),
        ({"ops": ["mean"], "ttl": 1}, USER, "mean", "expired"),
        ({"ops": ["mean"]}, USER, "export", "allows count, mean, not export"),
    ],
)
def test_the_authentication_transaction_is_refused_with_its_reason(
    s: Setup, setup: dict[str, Any] | None, keys: IdentityKeys, op: str, reason: str
) -> None:
    if setup is not None:
        terms = {"uses": 1, "ttl": 600, **setup}
        s.signed(OWNER, "data.grant", dataset="d", user="bob", **terms)
    if reason == "expired":
        s.signed(OTHER, "data.request", dataset="d", ops=["mean"], uses=1, ttl=5)  # clock moves
        s.requests += 1
        later = {"by": "eve", "request": f"eve:{s.requests}", "created": int(NOW) + 10}
        s.both("data.request", auth=later, dataset="d", ops=["mean"], uses=1, ttl=5)
    result = s.compute(keys, op, params={"column": "v"} if op == "mean" else {})
    assert isinstance(result, Refused) and reason in result.error, result
    assert not s.a.state.data.tokens


def test_uses_run_out_and_a_refused_token_is_never_given_back(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=1, ttl=600)
    issued = s.compute()
    assert isinstance(issued, TokenIssued)
    end = {"token": issued.token, "status": "refused", "reason": "x"}
    refused = s.both("data.consume", node="n-a", ends=[end])
    assert refused.ok
    consumed = {"token": issued.token, "status": "consumed", "result_hash": "ab" * 32}
    again = s.both("data.consume", node="n-a", ends=[consumed])
    assert isinstance(again, Refused) and again.code == "replay"
    late = s.compute()
    assert isinstance(late, Refused) and "no uses left" in late.error


def test_the_km_enclave_boxes_a_job_once_for_its_own_committed_token_only(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=3, ttl=600)
    mine, theirs = s.compute(), s.compute(node="n-b")
    assert isinstance(mine, TokenIssued) and isinstance(theirs, TokenIssued)
    svc = service("a")
    assert "no committed token" in job(s.a, svc, "t999").reason
    assert "is for n-b" in job(s.a, svc, theirs.token).reason
    rogue = job(s.a, service("a", ROGUE_ID), mine.token)
    assert not rogue.ok and rogue.ciphertext == b""
    first = job(s.a, svc, mine.token)
    assert first.ok
    second = job(s.a, svc, mine.token)
    assert not second.ok and "already used" in second.reason
    # A recorded challenge and answer do not open another attempt either.
    challenge = s.a.new_challenge()
    response = svc.answer_challenge(s.a.identity.measurement, challenge)
    replayed = s.a.provision_data_jobs([mine.token, theirs.token], challenge, response)
    assert not replayed.result.ok and set(replayed.refused) == {mine.token, theirs.token}
    # The box opens for that service instance only.
    with pytest.raises(ProvisioningError):
        DataJobs(service("a"), s.blob_dir).run(
            DataJobRequest(ciphertext=first.ciphertext.hex(), vouch=first.vouch.hex()), Ring()
        )


def test_a_revoked_grant_stops_tokens_before_and_inside_the_service(s: Setup) -> None:
    grant = s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=3, ttl=600)
    before = s.compute()
    assert isinstance(before, TokenIssued)
    svc = service("a")
    jobs = DataJobs(svc, s.blob_dir)
    boxed = job(s.a, svc, before.token)  # handed over before the revocation commits
    s.signed(OWNER, "data.revoke", grant=grant.grant)  # type: ignore[attr-defined]
    jobs.revoke(DataRevokeRequest(grants=[grant.grant]))  # type: ignore[attr-defined]
    reply, ring = run(jobs, boxed)
    assert reply.status == "refused" and "revoked" in reply.reason and not reply.sealed
    after = s.compute()
    assert isinstance(after, Refused) and "revoked" in after.error
    assert json.loads(ring.records[0])["sealed"] == ""


def test_the_service_refuses_tampered_blobs_foreign_parameters_and_replays(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=5, ttl=600)
    svc = service("a")
    jobs = DataJobs(svc, s.blob_dir)
    # Parameters sealed for another computation (another nonce) do not open here.
    foreign = seal_call(s.a.contract_input_key(), "bob", "00" * 16, canonical_json({"column": "v"}))
    cut = s.compute(sealed=foreign)
    assert isinstance(cut, TokenIssued)
    reply, _ = run(jobs, job(s.a, svc, cut.token))
    assert reply.status == "refused" and reply.reason.startswith("params")
    # Parameters that open but do not hash to the digest the token binds.
    other = s.compute(params={"column": "w"}, digest=params_digest({"column": "v"}))
    assert isinstance(other, TokenIssued)
    reply, _ = run(jobs, job(s.a, svc, other.token))
    assert reply.status == "refused" and reply.reason.startswith("params")
    # The host flips a bit of the blob.
    path = s.blob_dir / s.digest
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    tampered = s.compute()
    assert isinstance(tampered, TokenIssued)
    boxed = job(s.a, svc, tampered.token)
    reply, _ = run(jobs, boxed)
    assert reply.status == "refused" and reply.reason.startswith("blob-digest")
    # The same box relayed again: never a second run.
    reply, _ = run(jobs, boxed)
    assert reply.status == "refused" and "replay" in reply.reason
    path.unlink()
    missing = s.compute()
    assert isinstance(missing, TokenIssued)
    reply, _ = run(jobs, job(s.a, svc, missing.token))
    assert reply.status == "refused" and reply.reason.startswith("blob-missing")


def test_owners_only_act_on_their_own_datasets(s: Setup) -> None:
    refused = s.signed(OTHER, "data.grant", dataset="d", user="eve", ops=["mean"], uses=1, ttl=9)
    assert isinstance(refused, Refused) and refused.code == "forbidden"
    asked = s.signed(USER, "data.request", dataset="d", ops=["mean"], uses=1, ttl=60)
    request_id = asked.request  # type: ignore[attr-defined]
    assert isinstance(s.signed(USER, "data.approve", request=request_id), Refused)
    approved = s.signed(OWNER, "data.approve", request=request_id)
    assert approved.ok and approved.request == request_id  # type: ignore[attr-defined]
    again = s.signed(OWNER, "data.approve", request=request_id)
    assert isinstance(again, Refused) and "approved before" in again.error
    node_only = s.both("service.measured", node="n-x", measurement="00" * 32)
    assert isinstance(node_only, Refused)


def test_a_token_that_expired_before_its_job_is_refused_by_the_km_enclave(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=2, ttl=30)
    issued = s.compute()
    assert isinstance(issued, TokenIssued)
    expires = s.a.state.data.tokens[issued.token].expires_at
    s.requests += 1
    later = {"by": "eve", "request": f"eve:{s.requests}", "created": expires}  # the clock moves
    s.both("data.request", auth=later, dataset="d", ops=["mean"], uses=1, ttl=5)
    result = job(s.a, service("a"), issued.token)
    assert not result.ok and "expired" in result.reason and result.ciphertext == b""
    late = s.compute()
    assert isinstance(late, Refused) and "expired" in late.error


def test_a_webassembly_operation_runs_only_as_the_code_its_token_binds(s: Setup) -> None:
    code = wat2wasm((REPO / "examples/dataops/variance.wat").read_text())
    b64 = base64.b64encode(bytes(code)).decode()
    by_owner = s.signed(OWNER, "data.op_register", name="variance", code=b64)
    assert isinstance(by_owner, Refused) and by_owner.code == "forbidden"
    registered = s.signed(OPERATOR, "data.op_register", name="variance", code=b64)
    assert registered.ok, registered
    again = s.signed(OPERATOR, "data.op_register", name="variance", code=b64)
    assert isinstance(again, Refused) and "exists" in again.error  # a name is registered once
    builtin = s.signed(OPERATOR, "data.op_register", name="mean", code=b64)
    assert isinstance(builtin, Refused)
    s.register("w", ["variance"])
    s.signed(OWNER, "data.grant", dataset="w", user="bob", ops=["variance"], uses=1, ttl=600)
    issued = s.compute(op="variance", dataset="w")
    assert isinstance(issued, TokenIssued)
    token = s.a.state.data.tokens[issued.token]
    assert token.op_checksum == hashlib.sha256(bytes(code)).hexdigest()
    svc = service("a")
    reply, _ = run(DataJobs(svc, s.blob_dir), job(s.a, svc, issued.token))
    assert reply.status == "consumed", reply
    opened = json.loads(
        SealedBox(PrivateKey(USER.box_secret)).decrypt(base64.b64decode(reply.sealed))
    )
    assert opened["value"] == pytest.approx(statistics.pvariance(range(1, 21)))


def test_a_snapshot_keeps_every_data_record_and_a_capture_ignores_later_ends(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=3, ttl=600)
    s.signed(USER, "data.request", dataset="d", ops=["count"], uses=1, ttl=60)
    issued = s.compute()
    assert isinstance(issued, TokenIssued)
    serialise = s.a.state.snapshot_capture()
    before = s.a.state.snapshot()
    s.both("data.consume", node="n-a", ends=[{"token": issued.token, "status": "refused"}])
    assert serialise() == before  # the end applied after the capture is not in it
    restored = KMState.restore(s.a.state.snapshot())
    assert restored == s.a.state
    assert restored.data.tokens[issued.token].state == "refused"
    assert KMState.restore(before).data.tokens[issued.token].state == "issued"


def test_a_batch_of_ends_applies_each_on_its_own(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=4, ttl=600)
    mine, other, done = s.compute(), s.compute(node="n-b"), s.compute()
    assert all(isinstance(t, TokenIssued) for t in (mine, other, done))
    ids = [t.token for t in (mine, other, done)]  # type: ignore[union-attr]
    first = s.both("data.consume", node="n-a", ends=[{"token": ids[2], "status": "refused"}])
    assert first.ok
    ends = [
        {"token": ids[0], "status": "consumed", "result_hash": "cd" * 32},
        {"token": ids[1], "status": "refused"},  # n-b's token: not n-a's to end
        {"token": ids[2], "status": "consumed", "result_hash": "ef" * 32},  # ended before
        {"token": "t99999", "status": "refused"},
        {"token": ids[0], "status": "refused"},  # the same token twice in one batch
    ]
    result = s.both("data.consume", node="n-a", ends=ends)
    assert result.finished == [ids[0]]  # type: ignore[attr-defined]
    assert len(result.skipped) == 4  # type: ignore[attr-defined]
    tokens = s.a.state.data.tokens
    assert (tokens[ids[0]].state, tokens[ids[1]].state, tokens[ids[2]].state) == (
        "consumed", "issued", "refused",
    )  # fmt: skip
    replay = s.both("data.consume", node="n-a", ends=ends[:1])
    assert isinstance(replay, Refused) and replay.code == "replay"


def test_a_batch_boxes_each_good_token_once_and_refuses_the_rest_by_name(s: Setup) -> None:
    s.signed(OWNER, "data.grant", dataset="d", user="bob", ops=["mean"], uses=5, ttl=600)
    good = [s.compute(), s.compute()]
    theirs = s.compute(node="n-b")
    ids = [t.token for t in good]  # type: ignore[attr-defined]
    svc = service("a")
    challenge = s.a.new_challenge()
    response = svc.answer_challenge(s.a.identity.measurement, challenge)
    batch = s.a.provision_data_jobs(
        [*ids, theirs.token, "t4242", ids[0]],
        challenge,
        response,  # type: ignore[attr-defined]
    )
    assert batch.result.ok and batch.left == []
    assert set(batch.refused) == {theirs.token, "t4242"}  # type: ignore[attr-defined]
    reply = DataJobs(svc, s.blob_dir).run(
        DataJobRequest(ciphertext=batch.result.ciphertext.hex(), vouch=batch.result.vouch.hex()),
        Ring(),
    )
    assert [(e.token, e.status) for e in reply.ends] == [(t, "consumed") for t in ids]
