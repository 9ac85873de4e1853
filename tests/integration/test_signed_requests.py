"""Signed requests on real processes, tried as an attacker would: every mutating route refuses
an unsigned, forged, expired, replayed or wrong-role request with its specific code, and the
cluster's state is the same afterwards. Reads need an identity too; status stays open.

One node (its KM enclave verifies; a three-node cluster verifies the same way, on its leader)
with the test admin and an auditor as genesis identities.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kmnode.identity import IdentityKeys, sign_request
from kmnode.ledger import committed_commands, read_ledger

from .harness import LocalCluster, cluster_admin

pytestmark = pytest.mark.timeout(180)

AUDITOR = IdentityKeys.generate("aud")
MEASUREMENT = "ab" * 32
#: Every mutating route, with a body that would change the state if it were accepted.
MUTATING = [
    ("/v1/keys", {"name": "fresh"}),
    ("/v1/keys/db/rotate", {}),
    ("/v1/keys/db/release", {"node": "km1", "timeout": 5}),
    ("/v1/policy/allow", {"role": "service", "measurement": MEASUREMENT}),
    ("/v1/policy/disallow", {"role": "km", "measurement": MEASUREMENT}),
    ("/v1/policy/revoke-platform", {"platform_id": "platform-9"}),
    ("/v1/members/remove", {"name": "km1"}),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(
        tmp_path_factory.mktemp("signed"), nodes=1, identities=[AUDITOR.public(["auditor"])]
    )
    try:
        c.start_broker_and_capture()
        c.up()
        code, body = c.api("km1", "POST", "/v1/keys", {"name": "db"})
        assert code == 201, body
        yield c
    finally:
        c.close()


def snapshot(cluster: LocalCluster) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    state = {}
    for path in ("/v1/keys", "/v1/policy", "/v1/members", "/v1/releases"):
        code, body = cluster.api("km1", "GET", path)
        assert code == 200, body
        state[path] = body
    return state


def signed(keys: IdentityKeys, path: str, body: Any, **kw: Any) -> tuple[bytes, dict[str, str]]:
    data = json.dumps(body).encode()
    return data, {
        "Content-Type": "application/json",
        **sign_request(keys, "POST", path, data, **kw),
    }


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=[p for p, _ in MUTATING])
def test_a_mutating_route_refuses_each_bad_request_and_changes_nothing(
    cluster: LocalCluster, path: str, body: Any
) -> None:
    before = snapshot(cluster)
    admin = cluster_admin(cluster.root)

    code, answer = cluster.api("km1", "POST", path, body, signer=None)
    assert (code, answer["code"]) == (401, "unsigned"), answer

    impostor = IdentityKeys.generate(admin.name)  # the admin's name, another key
    code, answer = cluster.send("km1", "POST", path, *signed(impostor, path, body))
    assert (code, answer["code"]) == (401, "bad_signature"), answer

    stranger = IdentityKeys.generate("mallory")
    code, answer = cluster.send("km1", "POST", path, *signed(stranger, path, body))
    assert (code, answer["code"]) == (401, "unknown_identity"), answer

    old = time.time() - 3600
    code, answer = cluster.send("km1", "POST", path, *signed(admin, path, body, created=old))
    assert (code, answer["code"]) == (401, "expired"), answer

    _, headers = signed(admin, path, body)
    tampered = json.dumps({**body, "extra": 1}).encode()
    code, answer = cluster.send("km1", "POST", path, tampered, headers)
    assert (code, answer["code"]) == (401, "bad_signature"), answer

    code, answer = cluster.api("km1", "POST", path, body, signer=AUDITOR)
    assert (code, answer["code"]) == (403, "forbidden"), answer
    assert snapshot(cluster) == before


def test_a_signed_request_commits_once(cluster: LocalCluster) -> None:
    admin = cluster_admin(cluster.root)
    data, headers = signed(admin, "/v1/keys", {"name": "once"})
    code, answer = cluster.send("km1", "POST", "/v1/keys", data, headers)
    assert code == 201, answer
    before = snapshot(cluster)
    code, answer = cluster.send("km1", "POST", "/v1/keys", data, headers)
    assert (code, answer["code"]) == (409, "replay"), answer
    rotate = signed(admin, "/v1/keys/once/rotate", {})
    assert cluster.send("km1", "POST", "/v1/keys/once/rotate", *rotate)[0] == 200
    code, answer = cluster.send("km1", "POST", "/v1/keys/once/rotate", *rotate)
    assert (code, answer["code"]) == (409, "replay"), answer
    keys = {k["name"]: k for k in snapshot(cluster)["/v1/keys"]["keys"]}
    assert keys["once"]["generation"] == 2 and len(keys) == len(before["/v1/keys"]["keys"])


def test_reads_need_an_identity_and_status_does_not(cluster: LocalCluster) -> None:
    code, answer = cluster.api("km1", "GET", "/v1/keys", signer=None)
    assert (code, answer["code"]) == (401, "unsigned")
    code, answer = cluster.api("km1", "GET", "/v1/keys", signer=AUDITOR)
    assert code == 200 and "db" in {k["name"] for k in answer["keys"]}
    code, answer = cluster.api("km1", "GET", "/v1/status", signer=None)
    assert code == 200 and answer["ready"]


def test_the_operator_sees_who_did_what(cluster: LocalCluster) -> None:
    """The ledger records the signer and request of each operator command."""
    code, answer = cluster.api("km1", "POST", "/v1/keys", {"name": "audited"})
    assert code == 201, answer
    cluster.stop("km1")
    raft_dir = cluster.config.state_dir / "nodes" / "km1" / "raft"
    commands = [json.loads(e.data) for e in committed_commands(read_ledger(raft_dir))]
    audited = [c for c in commands if c.get("name") == "audited"]
    assert len(audited) == 1
    assert audited[0]["auth"]["by"] == cluster_admin(cluster.root).name
    assert audited[0]["auth"]["request"].startswith(f"{cluster_admin(cluster.root).name}:")
