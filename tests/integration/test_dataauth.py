"""Data authorization on real processes (issue 15): an owner registers an encrypted dataset and
grants a user ``mean`` twice; both computations succeed and only that user opens the results;
the third is refused; a revocation stops what comes after it; a host's tampered blob ends a
computation refused without a result; every node signs the same token bytes with the same
key; nothing of the data crosses the hosts in clear."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import VerifyKey

from kmnode.cli import cli
from kmnode.client import upload_blob
from kmnode.contracts.envelope import seal_call
from kmnode.dataauth.blob import new_dek, seal_dataset
from kmnode.dataauth.ops import canonical_json, params_digest
from kmnode.identity import IdentityKeys

from .harness import REPO, LocalCluster, cluster_admin, running, until

pytestmark = pytest.mark.timeout(300)

OWNER = IdentityKeys.generate("alice")
USER = IdentityKeys.generate("bob")
OTHER = IdentityKeys.generate("eve")
#: A value only the dataset holds: it must never appear on MQTT or in a node's files.
MARKER = "zq" + secrets.token_hex(6)
ROWS = [(i, 1000 + 10 * i) for i in range(40)]
CSV = ("id,salary,tag\n" + "".join(f"{i},{s},{MARKER}\n" for i, s in ROWS)).encode()
MEAN = sum(s for _, s in ROWS) / len(ROWS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    identities = [
        OWNER.public(["owner"]),
        USER.public(["user"]),
        OTHER.public(["user"]),
    ]
    with running(tmp_path_factory.mktemp("dataauth"), 3, identities) as c:
        yield c


def call(
    cluster: LocalCluster, keys: IdentityKeys, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    return cluster.leader_call(method, path, body, signer=keys)


def register(cluster: LocalCluster, name: str, privacy: str = "high") -> str:
    """What ``kmctl data register`` does: encrypt here, blob to every host, register."""
    code, keys = call(cluster, OWNER, "GET", "/v1/data/keys")
    assert code == 200, keys
    dek = new_dek()
    sealed = seal_dataset(name, CSV, dek)
    for node in cluster.config.nodes:
        upload_blob(node, sealed.digest_ct, sealed.ciphertext)
    wrapped = SealedBox(PublicKey(bytes.fromhex(keys["wrap_key"]))).encrypt(dek)
    body = {
        "name": name,
        "digest_ct": sealed.digest_ct,
        "digest_pt": sealed.digest_pt,
        "size": sealed.size,
        "privacy": privacy,
        "ops": ["mean", "count"],
        "wrapped_key": base64.b64encode(bytes(wrapped)).decode(),
    }
    code, answer = call(cluster, OWNER, "POST", "/v1/datasets", body)
    assert code == 201, answer
    return sealed.digest_ct


def compute(
    cluster: LocalCluster,
    keys: IdentityKeys,
    dataset: str,
    op: str = "mean",
    params: dict[str, Any] | None = None,
    node: str | None = None,
) -> tuple[int, Any]:
    """What ``kmctl data compute`` sends: parameters sealed here, their digest in the clear."""
    params = {"column": "salary"} if params is None else params
    code, answer = call(cluster, keys, "GET", "/v1/data/keys")
    assert code == 200, answer
    nonce = secrets.token_hex(16)
    body: dict[str, Any] = {
        "operation": op,
        "params": params_digest(params),
        "sealed": seal_call(
            bytes.fromhex(answer["input_key"]), keys.name, nonce, canonical_json(params)
        ),
        "nonce": nonce,
        "timeout": 30,
    }
    if node is not None:
        body["node"] = node
    return call(cluster, keys, "POST", f"/v1/datasets/{dataset}/computations", body)


def opened(token: dict[str, Any], keys: IdentityKeys) -> dict[str, Any]:
    sealed = base64.b64decode(token["sealed"])
    assert hashlib.sha256(sealed).hexdigest() == token["result_hash"]
    result: dict[str, Any] = json.loads(SealedBox(PrivateKey(keys.box_secret)).decrypt(sealed))
    return result


def grant(cluster: LocalCluster, dataset: str, user: str, ops: list[str], uses: int) -> str:
    body = {"user": user, "ops": ops, "uses": uses, "ttl": 600}
    code, answer = call(cluster, OWNER, "POST", f"/v1/datasets/{dataset}/grants", body)
    assert code == 200, answer
    return str(answer["grant"])


def test_two_uses_compute_the_third_is_refused_and_only_the_user_opens_them(
    cluster: LocalCluster,
) -> None:
    register(cluster, "salaries")
    grant(cluster, "salaries", "bob", ["mean"], 2)
    results = []
    for _ in range(2):
        code, token = compute(cluster, USER, "salaries")
        assert code == 200 and token["state"] == "consumed", token
        result = opened(token, USER)
        assert result["value"] == pytest.approx(MEAN)
        results.append(token)
    for keys in (OWNER, OTHER, IdentityKeys.generate("bob")):  # every other key, same name too
        with pytest.raises(CryptoError):
            opened(results[0], keys)
    code, refused = compute(cluster, USER, "salaries")
    assert code == 409 and "no uses left" in refused["error"], refused
    code, tokens = call(cluster, USER, "GET", "/v1/data/tokens", None)
    assert [t["state"] for t in tokens["tokens"]] == ["consumed", "consumed"]
    # The result reached the user's own topic, sealed; the same hash as committed.
    capture = cluster.capture
    assert capture is not None

    def published() -> bool:
        return len(capture.json_on("/users/bob/results")) >= 2

    until(published, 10, "the results on bob's topic")
    on_topic = {r["token"]: r for r in capture.json_on("/users/bob/results")}
    for token in results:
        assert on_topic[token["id"]]["result_hash"] == token["result_hash"]


def test_refusals_name_their_reason_and_release_nothing(cluster: LocalCluster) -> None:
    register(cluster, "census", privacy="high")
    grant(cluster, "census", "bob", ["count"], 5)
    cases = [
        (OTHER, "mean", "holds no grant"),  # another user: no grant of their own
        (USER, "mean", "covers count, not mean"),  # the wrong operation
        (USER, "export", "allows count, mean, not export"),  # raw rows of high-privacy data
    ]
    for keys, op, reason in cases:
        params = {"column": "salary"} if op == "mean" else {}
        code, answer = compute(cluster, keys, "census", op, params)
        assert code == 409 and reason in answer["error"], (op, answer)
    code, answer = compute(cluster, USER, "census", "count", {}, node="km9")
    assert code == 409 and "no member named 'km9'" in answer["error"]
    code, answer = call(cluster, OTHER, "POST", "/v1/datasets/census/grants",
                        {"user": "eve", "ops": ["count"], "uses": 1, "ttl": 60})  # fmt: skip
    assert code == 403, answer  # a user is no owner
    code, tokens = call(cluster, USER, "GET", "/v1/data/tokens", None)
    assert all(t["dataset"] != "census" for t in tokens["tokens"])  # no token was issued


def test_a_request_approved_then_revoked_stops_its_computations(cluster: LocalCluster) -> None:
    register(cluster, "visits")
    body = {"ops": ["mean"], "uses": 3, "ttl": 600}
    code, asked = call(cluster, USER, "POST", "/v1/datasets/visits/requests", body)
    assert code == 200 and asked["state"] == "open" and asked["owner"] == "alice", asked
    capture = cluster.capture
    assert capture is not None

    def published() -> bool:
        on_topic = capture.json_on("/owners/alice/requests")
        return any(r.get("request") == asked["request"] for r in on_topic)

    until(published, 10, "the request on alice's topic")
    code, approved = call(cluster, OWNER, "POST", f"/v1/data/requests/{asked['request']}/approve")
    assert code == 200, approved
    code, token = compute(cluster, USER, "visits")
    assert code == 200 and token["state"] == "consumed", token
    code, revoked = call(cluster, OWNER, "POST", f"/v1/data/grants/{approved['grant']}/revoke")
    assert code == 200 and revoked["state"] == "revoked", revoked
    code, answer = compute(cluster, USER, "visits")
    assert code == 409 and "revoked" in answer["error"], answer
    # Every node's service enclave was told (the lag is measured there).
    for name in cluster.names:

        def told(name: str = name) -> bool:
            code, view = cluster.api(name, "GET", "/v1/node/data")
            return code == 200 and view["revocation_lag"]["count"] >= 1

        until(told, 10, f"{name}'s service enclave to see the revocation")


def test_a_tampered_blob_ends_refused_and_the_use_is_not_given_back(
    cluster: LocalCluster,
) -> None:
    digest = register(cluster, "tampered")
    grant(cluster, "tampered", "bob", ["mean"], 2)
    victim = cluster.names[1]
    code, answer = cluster.api(victim, "POST", "/v1/chaos/tamper-blob", {"digest": digest})
    assert code == 200, answer
    code, token = compute(cluster, USER, "tampered", node=victim)
    assert code == 200 and token["state"] == "refused", token
    assert token["reason"].startswith("blob-digest") and "sealed" not in token
    code, dataset = call(cluster, USER, "GET", "/v1/datasets/tampered")
    assert dataset["grants"][0]["uses_left"] == 1  # spent, never re-credited
    other = cluster.names[2]
    code, token = compute(cluster, USER, "tampered", node=other)
    assert code == 200 and token["state"] == "consumed", token


def test_every_node_signs_the_same_token_and_nothing_leaks(cluster: LocalCluster) -> None:
    register(cluster, "signed")
    grant(cluster, "signed", "bob", ["count"], 1)
    code, token = compute(cluster, USER, "signed", "count", {})
    assert code == 200 and token["state"] == "consumed", token
    seen = []
    for name in cluster.names:

        def applied(name: str = name) -> bool:
            code, view = cluster.api(name, "GET", f"/v1/data/tokens/{token['id']}")
            return code == 200 and view["state"] == "consumed"

        until(applied, 10, f"{name} to apply the token's end")
        code, view = cluster.api(name, "GET", f"/v1/data/tokens/{token['id']}")
        code, keys = cluster.api(name, "GET", "/v1/data/keys")
        VerifyKey(bytes.fromhex(keys["token_key"])).verify(
            view["body"].encode(), bytes.fromhex(view["signature"])
        )
        seen.append((view["body"], view["signature"], keys["token_key"]))
    assert len(set(seen)) == 1
    body = json.loads(seen[0][0])
    assert body["user"] == "bob" and body["op"] == "count" and body["platform"]["node"]
    capture = cluster.capture
    assert capture is not None
    for topic, payload in capture.haystacks():
        assert MARKER.encode() not in payload, topic
    for path in Path(cluster.root).rglob("*"):
        if path.is_file() and path.stat().st_size < 64 << 20:
            assert MARKER.encode() not in path.read_bytes(), path


def test_kmctl_data_from_register_to_an_opened_result(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The operator's path: kmctl encrypts, uploads, registers, grants, computes, opens; the
    refusal exits 1 with the reason; `data result` fetches and checks it again."""
    keys = {}
    for who in (OWNER, USER):
        keys[who.name] = tmp_path / f"{who.name}.key"
        who.save(keys[who.name])
    data = tmp_path / "visits.csv"
    data.write_bytes(CSV)
    config = ["-c", str(cluster.config_path)]

    def kmctl(*args: str) -> Any:
        return CliRunner().invoke(cli, [*config, *args], catch_exceptions=False)

    done = kmctl("data", "register", "cli", str(data), "--ops", "mean,count",
                 "--as", str(keys["alice"]))  # fmt: skip
    assert done.exit_code == 0 and "registered dataset cli" in done.output, done.output
    done = kmctl("data", "grant", "cli", "--to", "bob", "--ops", "mean", "--uses", "1",
                 "--as", str(keys["alice"]))  # fmt: skip
    assert done.exit_code == 0, done.output
    compute_args = ("data", "compute", "cli", "--op", "mean", "--params", '{"column": "salary"}',
                    "--node", cluster.names[2], "--as", str(keys["bob"]))  # fmt: skip
    done = kmctl(*compute_args, "--json")
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["value"] == pytest.approx(MEAN)
    again = kmctl("data", "result", answer["token"], "--as", str(keys["bob"]))
    assert again.exit_code == 0 and float(again.output) == pytest.approx(MEAN), again.output
    refused = kmctl(*compute_args)
    assert refused.exit_code == 1 and "no uses left" in refused.output, refused.output
    listed = kmctl("data", "tokens", "--user", "bob", "--json")
    assert listed.exit_code == 0
    assert answer["token"] in {t["id"] for t in json.loads(listed.output)["tokens"]}
    status = kmctl("data", "status", "--json")
    assert status.exit_code == 0
    assert {v["node"] for v in json.loads(status.output)} == set(cluster.names)


def test_kmctl_a_webassembly_operation_registered_allowed_and_computed(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    admin = tmp_path / "admin.key"
    cluster_admin(cluster.root).save(admin)
    paths = {}
    for who in (OWNER, USER):
        paths[who.name] = tmp_path / f"{who.name}.key"
        who.save(paths[who.name])
    data = tmp_path / "w.csv"
    data.write_bytes(CSV)

    def kmctl(*args: str) -> Any:
        command = ["-c", str(cluster.config_path), *args]
        return CliRunner().invoke(cli, command, catch_exceptions=False)

    wat = str(REPO / "examples/dataops/variance.wat")
    done = kmctl("--as", str(admin), "data", "op-register", "variance", wat)
    assert done.exit_code == 0 and "registered operation variance" in done.output, done.output
    listed = kmctl("--as", str(admin), "data", "ops", "--json")
    assert {"variance", "mean"} <= {o["name"] for o in json.loads(listed.output)["ops"]}
    done = kmctl("data", "register", "wvar", str(data), "--ops", "variance",
                 "--as", str(paths["alice"]))  # fmt: skip
    assert done.exit_code == 0, done.output
    done = kmctl("data", "grant", "wvar", "--to", "bob", "--ops", "variance",
                 "--as", str(paths["alice"]))  # fmt: skip
    assert done.exit_code == 0, done.output
    done = kmctl("data", "compute", "wvar", "--op", "variance", "--params",
                 '{"column": "salary"}', "--as", str(paths["bob"]), "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    variance = sum((s - MEAN) ** 2 for _, s in ROWS) / len(ROWS)
    assert json.loads(done.output)["value"] == pytest.approx(variance)
