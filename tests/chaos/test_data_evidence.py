"""What the data checks read from the untrusted side is parsed strictly and never trusted on
shape: garbage on MQTT is skipped or counted, a node's malformed answer becomes an error view,
the evidence survives its JSON file; the client side refuses a result that is not the one
committed or not its own; the workload's records keep the plaintext out of their reprs."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey, SealedBox

from kmnode.chaos.data_calls import ComputeArgs, DataFormatError, GrantArgs, RevokeArgs
from kmnode.chaos.data_evidence import (
    DataEvidence,
    NodeData,
    parse_results,
    user_results_filter,
)
from kmnode.chaos.data_workload import DISALLOWED_OP, GRANTED_OPS, UNGRANTED_OP, DataWorkload
from kmnode.config import ClusterConfig
from kmnode.dataauth.client_side import (
    ResultHashMismatch,
    ResultUnopened,
    compute_body,
    open_result,
)
from kmnode.dataauth.ops import OpRefused, params_digest
from kmnode.identity import IdentityKeys

PREFIX, CLUSTER = "kmsim", "dev"
RECORD: dict[str, Any] = {
    "kind": "data.result", "token": "t7", "user": "bob", "dataset": "ds", "op": "mean",
    "status": "refused", "reason": "blob-digest: differs", "sealed": "", "result_hash": "",
}  # fmt: skip


def test_results_are_taken_from_service_and_user_topics_only_and_garbage_is_counted() -> None:
    good = json.dumps(RECORD).encode()
    batch = json.dumps({"records": [RECORD, {"kind": "contract.result", "seq": 1}]}).encode()
    messages = [
        (f"{PREFIX}/{CLUSTER}/km2/service/out", good),
        (f"{PREFIX}/{CLUSTER}/km3/service/out", batch),  # coalesced with another record
        (f"{PREFIX}/{CLUSTER}/users/bob/results", good),
        (f"{PREFIX}/{CLUSTER}/km1/events", good),  # not a service topic
        (f"{PREFIX}/other/km1/service/out", good),  # another cluster
        (f"{PREFIX}/{CLUSTER}/users/bob/other", good),
        (f"{PREFIX}/{CLUSTER}/km1/service/out", b"\xff\xfe not json"),
        (f"{PREFIX}/{CLUSTER}/km1/service/out", b"[" * 100_000),  # too deep for json
        (f"{PREFIX}/{CLUSTER}/km1/service/out", json.dumps({**RECORD, "token": 7}).encode()),
        (f"{PREFIX}/{CLUSTER}/km1/service/out", json.dumps({"kind": "data.result"}).encode()),
    ]
    records, malformed = parse_results(messages, PREFIX, CLUSTER)
    assert [(r.topic, r.source) for r in records] == [
        ("service", "km2"),
        ("service", "km3"),
        ("user", "bob"),
    ]
    assert malformed == 2
    assert user_results_filter(PREFIX, CLUSTER) == f"{PREFIX}/{CLUSTER}/users/+/results"


@pytest.mark.parametrize(
    "tokens",
    [None, {"tokens": "x"}, {"tokens": [{"id": "t1"}]}, {"tokens": [{"id": 1}]}, []],
)
def test_a_malformed_node_answer_becomes_an_error_view(tokens: Any) -> None:
    keys = {"wrap_key": "a", "token_key": "b", "input_key": "c"}
    view = NodeData.from_api(keys, tokens, {"grants": []}, {}, {})
    assert view.error.startswith("a malformed answer") and not view.tokens
    assert not view.settled


def test_the_evidence_survives_its_json_file(tmp_path: Path) -> None:
    record = parse_results(
        [(f"{PREFIX}/{CLUSTER}/km2/service/out", json.dumps(RECORD).encode())], PREFIX, CLUSTER
    )[0]
    evidence = DataEvidence(
        datasets=["ds"],
        nodes={"km1": NodeData(revocation_lag_ms=12.5), "km2": NodeData.unreadable("down")},
        records=record,
        malformed_records=3,
    )
    path = tmp_path / "data.json"
    path.write_text(json.dumps(evidence.to_json()))
    assert DataEvidence.from_json(json.loads(path.read_text())) == evidence
    assert list(evidence.readable()) == ["km1"]


def sealed_to(keys: IdentityKeys, plain: bytes) -> tuple[str, str]:
    sealed = SealedBox(PrivateKey(keys.box_secret).public_key).encrypt(plain)
    return base64.b64encode(sealed).decode(), hashlib.sha256(sealed).hexdigest()


def test_a_result_opens_only_if_it_is_the_committed_one_and_sealed_to_this_key() -> None:
    bob, eve = IdentityKeys.generate("bob"), IdentityKeys.generate("eve")
    sealed, digest = sealed_to(bob, b'{"op":"mean","value":5.0,"version":1}')
    assert open_result(sealed, digest, bob.box_secret)["value"] == 5.0
    with pytest.raises(ResultUnopened):
        open_result(sealed, digest, eve.box_secret)
    other, _ = sealed_to(bob, b'{"op":"mean","value":6.0,"version":1}')
    with pytest.raises(ResultHashMismatch):  # another result than the committed one
        open_result(other, digest, bob.box_secret)
    with pytest.raises(ResultHashMismatch):
        open_result("not base64!", digest, bob.box_secret)
    not_object, digest = sealed_to(bob, b"[1, 2]")
    with pytest.raises(ResultUnopened):
        open_result(not_object, digest, bob.box_secret)


def test_a_compute_body_binds_the_canonical_parameters_it_seals() -> None:
    column = "salary_of_q7v"
    key = bytes(PrivateKey.generate().public_key)
    body = compute_body(key, "bob", "mean", {"column": column})
    assert body["params"] == params_digest({"column": column})
    assert body["operation"] == "mean" and len(body["nonce"]) == 32
    assert column not in json.dumps(body)  # sealed: only a service enclave opens it
    with pytest.raises(OpRefused):
        compute_body(key, "bob", "mean", {"column": column, "extra": 1})


def workload(tmp_path: Path) -> tuple[DataWorkload, IdentityKeys]:
    cfg = ClusterConfig.default(3).model_copy(update={"state_dir": tmp_path})
    signer = IdentityKeys.generate("dev-admin")
    IdentityKeys.generate("eve").save(tmp_path / "identities" / "eve.key")
    (tmp_path / "identities" / "broken.key").write_text("garbage")
    return DataWorkload(cfg, signer, 7), signer


def test_the_workload_holds_its_keys_and_secrets_and_shows_none(tmp_path: Path) -> None:
    data, signer = workload(tmp_path)
    keys = data.keyring()
    assert [(k.name, k.decoy) for k in keys] == [
        ("dev-admin", False),
        ("eve", False),
        ("dev-admin", True),
    ]
    assert keys[0].box_secret == signer.box_secret and keys[2].box_secret != signer.box_secret
    dek, plaintext = data.secrets()
    assert len(dek) == 32 and data.marker.encode() in plaintext
    shown = repr(data) + repr(keys) + repr(data.expected) + repr(data.sealed)
    for secret in (dek.hex(), data.marker, signer.box_secret.hex()):
        assert secret not in shown
    assert data.blob[0] == hashlib.sha256(data.blob[1]).hexdigest()
    assert data.marker.encode() not in data.blob[1]


def test_the_workloads_choices_cover_every_kind_and_revoke_each_grant_once(
    tmp_path: Path,
) -> None:
    import random

    data, _ = workload(tmp_path)
    rng = random.Random(3)
    ops = [data.next_op(rng, "km2") for _ in range(300)]
    kinds = {kind for kind, _ in ops}
    assert kinds == {"data.compute", "data.grant"}  # nothing to revoke: no grant made yet
    computes = [a for _, a in ops if isinstance(a, ComputeArgs)]
    assert {a.op for a in computes} == {*GRANTED_OPS, UNGRANTED_OP, DISALLOWED_OP}
    assert all(a.node == "km2" and a.user == "dev-admin" for a in computes)
    assert any(a.ttl < 60 for _, a in ops if isinstance(a, GrantArgs))  # some expire soon
    data._grants = ["g1", "g2"]
    revoked = [a.grant for _, a in (data.next_op(rng, "km1") for _ in range(200))
               if isinstance(a, RevokeArgs)]  # fmt: skip
    assert sorted(revoked) == ["g1", "g2"]
    with pytest.raises(DataFormatError, match="ComputeArgs: intent"):
        ComputeArgs.parse({**computes[0].to_json(), "intent": "anything"})
