"""Disaster recovery on real processes (issue 16): a 3-node cluster with three recovery holders
(2 of 3 rebuild the secret) and a key in several generations loses every node's sealed state.
The nodes start in recovery mode; one share leaves them sealed, a bogus share and a stranger's
are refused when submitted, and the second valid share reopens the cluster, whose service
enclaves then prove the same MAC for every generation as before the loss."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from attest.identity import EnclaveRole
from attest.quote import QuoteVerifier
from kmnode.datadir import RECOVER_MARKER, SEALED_STATE
from kmnode.enclave_code import RELEASE_VARIABLE, current_measurements, release_identity
from kmnode.identity import IdentityKeys
from kmnode.recovery.boxing import box_share, verify_recovery_key
from kmnode.recovery.shares import RecoverySet, Share, open_share
from kmnode.simhw import HardwareStore
from kmnode.supervisor import mark_for_recovery

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(300)

#: The release the cluster moves to: both enclaves' measured code changes
#: (``kmnode.enclave_code.RELEASE_VARIABLE``).
NEW_RELEASE = "2: a changed enclave module"
HOLDERS = {name: IdentityKeys.generate(name) for name in ("rec-a", "rec-b", "rec-c")}
CHALLENGE = "5eed" * 8
GENERATIONS = (1, 2, 3)


def recovery_view(cluster: LocalCluster, name: str) -> dict[str, Any]:
    code, view = cluster.api(name, "GET", "/v1/recovery")
    assert code == 200 and isinstance(view, dict), view
    return view


def prove_all(cluster: LocalCluster, target: str) -> dict[int, str]:
    """Release every generation of ``db`` to ``target`` and have its service MAC the challenge."""
    macs = {}
    for generation in GENERATIONS:
        code, reply = cluster.leader_call(
            "POST", "/v1/keys/db/release", {"node": target, "generation": generation}
        )
        assert code == 200 and reply["releases"][0]["status"] == "provisioned", reply
        body = {"key": "db", "generation": generation, "challenge": CHALLENGE}
        code, proof = cluster.api(target, "POST", "/v1/service/prove", body)
        assert code == 200, proof
        macs[generation] = proof["mac"]
    return macs


def kmctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.kmctl(*args)


def key_file(root: Path, name: str) -> Path:
    path = root / "keys" / f"{name}.key"
    if not path.exists():
        HOLDERS[name].save(path)
    return path


def all_recovering(cluster: LocalCluster) -> bool:
    """Every node in recovery mode (not ready: it has no secret) with a leader elected."""
    statuses = [cluster.status(n) for n in cluster.names]
    return all(
        s is not None and s.get("recovering") and s.get("leader") and not s["ready"]
        for s in statuses
    )


def recovering_leader(cluster: LocalCluster) -> str:
    for name in cluster.names:
        status = cluster.status(name)
        if status is not None and status.get("role") == "leader":
            return name
    raise AssertionError("no leader")


def all_open(cluster: LocalCluster) -> bool:
    statuses = [cluster.status(n) for n in cluster.names]
    return all(s is not None and s["ready"] and s["has_master_secret"] for s in statuses)


@contextlib.contextmanager
def holders_cluster(root: Path) -> Iterator[LocalCluster]:
    """A 3-node cluster whose recovery holders are ``HOLDERS`` (2 of 3 rebuild the secret),
    with key ``db`` in generations 1..3; stopped on leaving."""
    holders = [keys.public(["recovery"]) for keys in HOLDERS.values()]
    cluster = LocalCluster(root, 3, identities=holders)
    try:
        cluster.start_broker_and_capture()
        cluster.up()
        assert cluster.leader_call("POST", "/v1/keys", {"name": "db"})[0] == 201
        for _ in GENERATIONS[1:]:
            assert cluster.leader_call("POST", "/v1/keys/db/rotate")[0] == 200
        yield cluster
    finally:
        cluster.close()


def submit_shares(cluster: LocalCluster, *holders: str) -> None:
    for holder in holders:
        done = kmctl(cluster, "recovery", "submit", "--as", str(key_file(cluster.root, holder)))
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with holders_cluster(tmp_path_factory.mktemp("recovery")) as c:
        yield c


def test_a_cluster_that_lost_every_sealed_state_recovers_with_two_of_three_shares(
    cluster: LocalCluster,
) -> None:
    root = cluster.root
    leader = cluster.leader()
    assert cluster.status(leader)["mode"] == "genesis"  # type: ignore[index]
    until(lambda: recovery_view(cluster, leader)["generation"] == 1, 20, "the genesis split")
    split = recovery_view(cluster, leader)
    assert split["holders"] == sorted(HOLDERS) and split["threshold"] == 2
    before = prove_all(cluster, "km2")
    assert len(set(before.values())) == len(GENERATIONS)

    # Every node loses its sealed state.
    for name in cluster.names:
        cluster.stop(name)
    for name in cluster.names:
        (cluster.config.state_dir / "nodes" / name / SEALED_STATE).unlink()

    # Without the operator asking for recovery, a node refuses to start and says how.
    cluster.start("km1")
    assert cluster.procs["km1"].wait(60) != 0
    assert "kmctl up --recover" in cluster.log_tail("km1", 40)

    for name in cluster.names:
        assert "recovery mode" in mark_for_recovery(cluster.config, name)
        cluster.start(name)
    until(lambda: all_recovering(cluster), 60, "every node in recovery mode with a leader")
    code, refused = cluster.api(recovering_leader(cluster), "GET", "/v1/keys")
    assert code == 503 and "recovery mode" in refused["error"]

    # One share of the two needed: recorded, and the cluster stays sealed.
    first = kmctl(cluster, "recovery", "submit", "--as", str(key_file(root, "rec-a")))
    assert first.returncode == 0, first.stderr
    assert "accepted (1 of 2)" in first.stdout
    time.sleep(1.0)
    assert all_recovering(cluster)
    assert recovery_view(cluster, "km3")["submitted"] == ["rec-a"]
    # A node that crashes in the middle of the ceremony comes back in recovery mode with the
    # share it had (the share is in the ledger, boxed to its enclave's lasting recovery key).
    cluster.kill("km3")
    cluster.start("km3")
    until(lambda: all_recovering(cluster), 60, "km3 back in recovery mode")
    assert recovery_view(cluster, "km3")["submitted"] == ["rec-a"]

    # The same holder again, a stranger, and a bogus share: refused at submission.
    again = kmctl(cluster, "recovery", "submit", "--as", str(key_file(root, "rec-a")))
    assert again.returncode != 0 and "already submitted" in again.stderr
    stranger = IdentityKeys.generate("eve")
    eve_path = root / "keys" / "eve.key"
    stranger.save(eve_path)
    eve = kmctl(cluster, "recovery", "submit", "--as", str(eve_path))
    assert eve.returncode != 0 and "no identity named 'eve'" in eve.stderr
    code, answer = cluster.api(
        recovering_leader(cluster),
        "POST",
        "/v1/recovery/shares",
        {"generation": 1, "boxes": {"km1": "A" * 108}},
    )  # the cluster's admin, who holds no share
    assert code == 403 and "recovery role" in answer["error"]
    code, answer = submit_raw(cluster, "rec-b", bogus=True)
    assert code == 409 and "rec-b" in answer["error"] and "commitment" in answer["error"]
    bogus_file = root / "keys" / "bogus.share"
    bogus_file.write_text(Share("rec-b", 2, b"\x01" * 32).to_b64())
    local = kmctl(cluster, "recovery", "submit", "--as", str(key_file(root, "rec-b")),
                  "--share-file", str(bogus_file))  # fmt: skip
    assert local.returncode != 0 and "rec-b" in local.stderr and "nothing was sent" in local.stderr
    assert recovery_view(cluster, "km2")["submitted"] == ["rec-a"]
    assert all_recovering(cluster)

    # The second valid share reopens every node.
    second = kmctl(cluster, "recovery", "submit", "--as", str(key_file(root, "rec-c")))
    assert second.returncode == 0, second.stderr
    assert "accepted (2 of 2)" in second.stdout
    until(lambda: all_open(cluster), 60, "every node open again")
    for name in cluster.names:
        node_dir = cluster.config.state_dir / "nodes" / name
        until((node_dir / SEALED_STATE).is_file, 10, f"{name} sealed again")
        assert not (node_dir / RECOVER_MARKER).exists()

    # Every generation proves the same MAC as before, on km2 and on another node.
    assert prove_all(cluster, "km2") == before
    assert prove_all(cluster, "km3") == before
    # Fresh shares were issued, and a holder opens its new one.
    until(lambda: recovery_view(cluster, "km1")["generation"] == 2, 20, "a fresh split")
    fresh = RecoverySet.from_json(json.dumps(recovery_view(cluster, "km1")["recovery_set"]))
    assert open_share(fresh, "rec-b", HOLDERS["rec-b"].box_secret).index == 2
    # Releases work again: a new key, released.
    assert cluster.leader_call("POST", "/v1/keys", {"name": "after"})[0] == 201
    code, reply = cluster.leader_call("POST", "/v1/keys/after/release", {"node": "km1"})
    assert code == 200 and reply["releases"][0]["status"] == "provisioned", reply

    # A second loss: the ledger still holds the first ceremony's boxes, but they were for
    # that recovery's keys. The cluster stays sealed until the holders submit again.
    for name in cluster.names:
        cluster.stop(name)
        (cluster.config.state_dir / "nodes" / name / SEALED_STATE).unlink()
        mark_for_recovery(cluster.config, name)
        cluster.start(name)
    until(lambda: all_recovering(cluster), 60, "every node recovering again")
    time.sleep(2.0)
    assert all_recovering(cluster)
    view = recovery_view(cluster, recovering_leader(cluster))
    assert view["generation"] == 2 and view["submitted"] == []


def test_the_whole_cluster_moves_to_a_new_km_build_through_recovery(
    tmp_path: Path,
) -> None:
    """All at once: governance allows the new build's measurement, every node restarts on it,
    none can open its old build's sealed state (sealing binds the build), and the holders'
    shares reopen the cluster on the new build with every key generation unchanged."""
    new = {role: release_identity(role, NEW_RELEASE).measurement.hex() for role in EnclaveRole}
    with holders_cluster(tmp_path) as cluster:
        before = prove_all(cluster, "km2")
        for role in EnclaveRole:  # the release changes both enclaves
            body = {"role": role.value, "measurement": new[role]}
            code, allowed = cluster.leader_call("POST", "/v1/policy/allow", body)
            assert code == 200 and allowed["state"] == "accepted", allowed
        # The operators' own tools trust the new build too (kmctl checks recovery keys' quotes).
        config = yaml.safe_load(cluster.config_path.read_text())
        config["policy"]["km_measurements"] = ["@current", new[EnclaveRole.KM]]
        cluster.config_path.write_text(yaml.safe_dump(config))

        for name in cluster.names:
            cluster.stop(name)
        for name in cluster.names:
            assert "resumes if its sealed state opens" in mark_for_recovery(cluster.config, name)
            cluster.start(name, env={RELEASE_VARIABLE: NEW_RELEASE})
        until(lambda: all_recovering(cluster), 60, "every node of the new build recovering")
        submit_shares(cluster, "rec-b", "rec-c")
        until(lambda: all_open(cluster), 60, "the cluster open on the new build")
        for name in cluster.names:
            code, attested = cluster.api(name, "GET", "/v1/attest")
            assert code == 200 and attested["identity"]["measurement"] == new[EnclaveRole.KM]
        assert prove_all(cluster, "km2") == before
        assert prove_all(cluster, "km1") == before


def test_a_saved_snapshot_restores_onto_fresh_nodes_which_recover_the_same_keys(
    tmp_path: Path,
) -> None:
    """Backup and restore: a snapshot saved from the live cluster (read in chunks, checked),
    every node's directory lost, the snapshot restored into fresh directories; the nodes
    start from it in recovery mode and the holders' shares bring back every key generation."""
    with holders_cluster(tmp_path) as cluster:
        for i in range(40):
            assert cluster.leader_call("POST", "/v1/keys", {"name": f"bulk-{i}"})[0] == 201
        before = prove_all(cluster, "km3")
        backup = tmp_path / "backup.snap"
        saved = kmctl(cluster, "snapshot", "save", str(backup), "--node", "km2", "--json")
        assert saved.returncode == 0, saved.stderr
        summary = json.loads(saved.stdout)
        assert summary["keys"] == 41 and summary["members"] == ["km1", "km2", "km3"]
        again = kmctl(cluster, "snapshot", "save", str(backup))
        assert again.returncode != 0 and "not overwriting" in again.stderr

        for name in cluster.names:
            cluster.stop(name)
        nodes_dir = cluster.config.state_dir / "nodes"
        nodes_dir.rename(tmp_path / "lost-nodes")  # every node's directory is gone
        tampered = tmp_path / "tampered.snap"
        raw = bytearray(backup.read_bytes())
        raw[-10] ^= 1
        tampered.write_bytes(bytes(raw))
        refused = kmctl(cluster, "snapshot", "restore", str(tampered))
        assert refused.returncode != 0 and "fabricated" in refused.stderr
        assert not nodes_dir.exists()  # nothing seeded from a refused snapshot
        restored = kmctl(cluster, "snapshot", "restore", str(backup))
        assert restored.returncode == 0, restored.stderr
        for name in cluster.names:
            cluster.start(name)
        until(lambda: all_recovering(cluster), 60, "the restored nodes in recovery mode")
        view = recovery_view(cluster, "km1")
        assert view["applied"] >= summary["index"]
        submit_shares(cluster, "rec-a", "rec-c")
        until(lambda: all_open(cluster), 60, "the restored cluster open")
        assert prove_all(cluster, "km3") == before
        code, keys = cluster.leader_call("GET", "/v1/keys")
        assert code == 200 and len(keys["keys"]) == 41


def submit_raw(cluster: LocalCluster, holder: str, *, bogus: bool) -> tuple[int, Any]:
    """A holder's submission made by hand (what kmctl sends), with a wrong share when
    ``bogus``: the leader's enclave must refuse it, however well it is boxed."""
    leader = recovering_leader(cluster)
    view = recovery_view(cluster, leader)
    split = RecoverySet.from_json(json.dumps(view["recovery_set"]))
    share = open_share(split, holder, HOLDERS[holder].box_secret)
    if bogus:
        share = Share(holder, share.index, bytes(b ^ 0x80 for b in share.value))
    verifier = QuoteVerifier(
        HardwareStore(cluster.config.state_dir / "hardware").vendor_public_key()
    )
    policy = cluster.config.policy.resolve(current_measurements())
    keys = {}
    for member in view["members"]:
        code, answer = cluster.api(member["name"], "GET", "/v1/recovery/key")
        assert code == 200, answer
        keys[member["name"]] = verify_recovery_key(
            member["name"], member["platform_id"], answer, verifier, policy, time.time()
        )
    body = {"generation": split.generation, "boxes": box_share(share, keys)}
    return cluster.api(leader, "POST", "/v1/recovery/shares", body, signer=HOLDERS[holder])
