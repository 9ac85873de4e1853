"""Confidential contracts on real processes: a 3-node cluster runs the token contract for
several callers; every node executes every call and reaches the same roots at every committed
checkpoint; the results equal a plain Python model of the token; one node's host tampers with
its store, that node stops executing and says why, and a resync from a peer repairs it.

Nothing of the arguments or results crosses the hosts in clear: the MQTT capture and each
node's store are searched for them."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from kmnode.cli.contracts_cmds import encode_args
from kmnode.contracts.envelope import open_result, seal_call
from kmnode.identity import IdentityKeys

from .harness import REPO, LocalCluster, running, until

pytestmark = pytest.mark.timeout(300)

USERS = {name: IdentityKeys.generate(name) for name in ("alice", "bob", "carol")}
TOKEN = wasmtime.wat2wasm((REPO / "examples/contracts/token.wat").read_text())
#: Small on purpose: checkpoints come often, and the cache misses (so tampering is read).
CONTRACTS = {"checkpoint_every": 6, "cache_entries": 1, "flush_every": 1}
#: A secret-looking argument: it must never appear on MQTT or in a store.
MARKER = "zq" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    users = [keys.public(["user"]) for keys in USERS.values()]
    with running(tmp_path_factory.mktemp("contracts"), 3, users, CONTRACTS) as c:
        code, body = c.leader_call(
            "POST", "/v1/contracts", {"name": "token", "code": base64.b64encode(TOKEN).decode()}
        )
        assert code == 201 and body["status"] == "deployed", body
        yield c


def call(cluster: LocalCluster, caller: str, function: str, *args: str) -> dict[str, Any]:
    """A call as kmctl makes it: arguments sealed here, the result opened here."""
    keys = USERS[caller]
    code, answer = cluster.leader_call("GET", "/v1/contract-input-key", signer=keys)
    assert code == 200, answer
    nonce, reply = secrets.token_hex(16), secrets.token_bytes(32)
    sealed = seal_call(bytes.fromhex(answer["input_key"]), caller, nonce, encode_args(args), reply)
    body = {"function": function, "args": sealed, "nonce": nonce, "timeout": 20}
    code, answer = cluster.leader_call("POST", "/v1/contracts/token/calls", body, signer=keys)
    assert code == 200 and answer["status"] != "pending", answer
    return {**open_result(keys.box_secret, answer["sealed"], reply), "digest": answer["digest"]}


def balance(result: dict[str, Any]) -> int:
    return int.from_bytes(base64.b64decode(result["result"]), "little")


def views(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    found = {}
    for name in cluster.names:
        code, view = cluster.api(name, "GET", "/v1/node/contracts")
        assert code == 200, view
        found[name] = view
    return found


def caught_up(cluster: LocalCluster, names: list[str] | None = None) -> None:
    def done() -> bool:
        seen = views(cluster)
        return all(
            v["position"] == v["committed"] and not v["halted"]
            for n, v in seen.items()
            if names is None or n in names
        )

    until(done, 30, "every node to execute every committed call")


def test_every_node_executes_every_call_to_the_same_roots(cluster: LocalCluster) -> None:
    model = {"alice": 0, "bob": 0, "carol": 0}
    assert call(cluster, "alice", "init")["status"] == "ok"
    for who, amount in (("alice", 100), ("bob", 40), ("carol", 7)):
        assert call(cluster, "alice", "mint", f"u64:{amount}", who)["status"] == "ok"
        model[who] += amount
    assert call(cluster, "bob", "mint", "u64:5", "bob")["code"] == 5  # not the owner
    transfers = [("alice", "bob", 30), ("bob", "carol", 55), ("carol", "alice", 1000)]
    transfers += [("carol", "alice", 2), ("alice", MARKER, 3)]
    for payer, payee, amount in transfers:
        result = call(cluster, payer, "transfer", f"u64:{amount}", payee)
        if model[payer] >= amount:
            assert result["status"] == "ok", result
            model[payer] -= amount
            model[payee] = model.get(payee, 0) + amount
        else:
            assert (result["status"], result["code"]) == ("reverted", 2)
    for who, expected in model.items():
        assert balance(call(cluster, "carol", "balance", who)) == expected
    caught_up(cluster)
    seen = views(cluster)
    committed = {c["seq"]: c["roots"] for c in seen["km1"]["checkpoints"]}
    assert committed, "no checkpoint was committed"
    for name, view in seen.items():
        computed = {c["seq"]: c["roots"] for c in view["service"]["checkpoints"]}
        for seq, roots in committed.items():
            assert computed.get(seq) == roots, (name, seq)
    # The calls' arguments and results never crossed a host in clear.
    assert cluster.capture is not None
    assert not any(MARKER.encode() in payload for _, payload in cluster.capture.haystacks())
    for name in cluster.names:
        with sqlite3.connect(cluster.config.state_dir / "nodes" / name / "contracts.sqlite") as db:
            rows = db.execute("SELECT contract, hidden, record FROM records").fetchall()
        assert rows and not any(MARKER.encode() in bytes(r[2]) for r in rows)
        assert not any(b"alice" in bytes(r[1]) + bytes(r[2]) for r in rows)


def kmctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmnode.cli", "-c", str(cluster.config_path), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def test_kmctl_shows_roots_cache_and_contracts(cluster: LocalCluster) -> None:
    caught_up(cluster)
    roots = kmctl(cluster, "contracts", "roots")
    assert roots.returncode == 0 and "match" in roots.stdout and "DIFFERS" not in roots.stdout
    cache = kmctl(cluster, "contracts", "cache", "--json")
    assert cache.returncode == 0, cache.stderr
    views = json.loads(cache.stdout)
    assert set(views) == set(cluster.names)
    assert all(v["service"]["cache"]["misses"] > 0 for v in views.values())
    listed = kmctl(cluster, "contracts", "list", "--json")
    assert [c["name"] for c in json.loads(listed.stdout)["contracts"]] == ["token"]
    missing = kmctl(cluster, "contracts", "show", "nope")
    assert missing.returncode == 2 and "no contract named" in missing.stderr  # as keys show


def test_a_tampered_store_stops_its_node_and_a_resync_repairs_it(cluster: LocalCluster) -> None:
    caught_up(cluster)
    code, tampered = cluster.api("km3", "POST", "/v1/chaos/tamper-state", {"mode": "flip"})
    assert code == 200, tampered
    # Calls that between them read every key (the owner, each account), twice: the one entry
    # the enclave's cache holds is read from the host the second time.
    for _ in range(2):
        call(cluster, "alice", "mint", "u64:1", "alice")
        for who in USERS:
            call(cluster, who, "transfer", "u64:1", "alice")
        call(cluster, "bob", "balance", MARKER)

    def km3_halted() -> bool:
        return bool(views(cluster)["km3"]["halted"])

    until(km3_halted, 30, "km3 to stop executing")
    reason = views(cluster)["km3"]["halted"]
    assert "flipped" in reason and "tampered" in reason, reason
    caught_up(cluster, ["km1", "km2"])  # the others go on
    result = subprocess.run(
        [sys.executable, "-m", "kmnode.cli", "-c", str(cluster.config_path),
         "contracts", "resync", "km3"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "executing" in result.stdout
    caught_up(cluster)
    before = views(cluster)["km1"]["committed"]
    for _ in range(CONTRACTS["checkpoint_every"]):
        call(cluster, "bob", "balance", "bob")
    caught_up(cluster)
    seen = views(cluster)
    newest = seen["km1"]["checkpoints"][-1]
    assert newest["seq"] > before
    for name, view in seen.items():
        computed = {c["seq"]: c["roots"] for c in view["service"]["checkpoints"]}
        assert computed[newest["seq"]] == newest["roots"], name


def roots_agree(cluster: LocalCluster) -> None:
    """Every node's computed roots at the newest committed checkpoint are the committed ones."""
    seen = views(cluster)
    newest = seen["km1"]["checkpoints"][-1]
    for name, view in seen.items():
        computed = {c["seq"]: c["roots"] for c in view["service"]["checkpoints"]}
        assert computed.get(newest["seq"]) == newest["roots"], name


@pytest.mark.parametrize("how", ["service-crash", "node-restart"])
def test_a_crashed_service_or_node_restores_and_replays(cluster: LocalCluster, how: str) -> None:
    caught_up(cluster)
    if how == "service-crash":
        code, body = cluster.api("km2", "POST", "/v1/chaos/service-crash")
        assert code == 200, body
    else:
        cluster.kill("km2")
    for i in range(CONTRACTS["checkpoint_every"] + 2):  # across a checkpoint while it is down
        call(cluster, "carol", "transfer", "u64:0", "bob" if i % 2 else "alice")
    if how == "node-restart":
        cluster.start("km2")
        cluster.wait_ready("km2")
    caught_up(cluster)
    for _ in range(CONTRACTS["checkpoint_every"]):
        call(cluster, "bob", "balance", "carol")
    caught_up(cluster)
    roots_agree(cluster)
    assert views(cluster)["km2"]["service"]["restores"] >= 1


def test_a_call_from_someone_who_is_not_a_user_is_refused(cluster: LocalCluster) -> None:
    body = {"function": "init", "args": "A" * 64, "nonce": "ab" * 16}
    code, answer = cluster.leader_call("POST", "/v1/contracts/token/calls", body)  # the admin
    assert code == 403 and answer["code"] == "forbidden", answer
    code, answer = cluster.leader_call(
        "POST", "/v1/contracts/token/calls", {**body, "fuel": -1}, signer=USERS["bob"]
    )
    assert code == 400 and answer.get("field") == "fuel", answer
