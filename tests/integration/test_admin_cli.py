"""Operator verbs on a live cluster (issue 18): `kmctl members transfer-leader` moves the
leadership where asked (and refuses a stranger), and `kmctl audit export` writes the audit
trail as JSON lines that match `kmctl releases list` record for record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmnode.identity import dev_key_path

from .harness import REPO, LocalCluster, running, until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("admin-cli"), 3) as c:
        yield c


def kmctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.kmctl(*args)


def test_transfer_leader_moves_the_leadership_and_refuses_a_stranger(
    cluster: LocalCluster,
) -> None:
    old = cluster.leader()
    target = next(n for n in cluster.names if n != old)
    moved = kmctl(cluster, "members", "transfer-leader", target, "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) == {"leader": target, "previous": old, "moved": True}
    until(lambda: cluster.leader() == target, 20, f"{target} leading")
    stranger = kmctl(cluster, "members", "transfer-leader", "km9")
    assert stranger.returncode != 0 and "not a voting member" in stranger.stderr
    again = kmctl(cluster, "members", "transfer-leader", target)
    assert again.returncode == 0 and "already leads" in again.stdout


def test_audit_export_matches_the_release_records(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.leader_call("POST", "/v1/keys", {"name": "audited"})[0] == 201
    code, reply = cluster.leader_call("POST", "/v1/keys/audited/release", {"node": "all"})
    assert code == 200, reply
    out = tmp_path / "audit.jsonl"
    exported = kmctl(cluster, "audit", "export", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    listed = json.loads(kmctl(cluster, "releases", "list", "--json").stdout)["releases"]
    requested = {r["release"]: r for r in records if r["kind"] == "release.requested"}
    outcomes = {r["release"]: r["kind"].split(".", 1)[1] for r in records
                if r["kind"] in ("release.provisioned", "release.refused")}  # fmt: skip
    assert set(requested) == {r["id"] for r in listed}
    for release in listed:
        assert requested[release["id"]]["key"] == release["key"]
        assert outcomes.get(release["id"], "requested") == release["status"]
    tail = kmctl(cluster, "audit", "export", "--since", str(records[-2]["index"]))
    assert [json.loads(line) for line in tail.stdout.splitlines()] == [
        r for r in records if r["index"] > records[-2]["index"]
    ]
    assert kmctl(cluster, "audit", "export", "-o", str(out)).returncode == 2  # not overwritten


def test_a_cluster_is_reached_by_endpoint_without_its_file(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """From a directory without cluster.yaml: `--endpoint` (or KMSIM_ENDPOINTS) names a node;
    a write sent to a follower finds and follows the leader."""
    follower = next(n for n in cluster.names if n != cluster.leader())
    spec = cluster.config.node(follower)
    url = f"http://{spec.host}:{spec.api_port}"
    key = str(dev_key_path(cluster.config.state_dir))
    base = [sys.executable, "-m", "kmnode.cli", "--as", key]

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )  # fmt: skip

    created = run("--endpoint", url, "keys", "create", "by-endpoint", "--json")
    assert created.returncode == 0, created.stderr
    assert "embedded defaults" not in created.stderr
    listed = run("keys", "list", "--json", env={"KMSIM_ENDPOINTS": f"http://127.0.0.1:9, {url}"})
    assert listed.returncode == 0, listed.stderr
    assert "by-endpoint" in {k["name"] for k in json.loads(listed.stdout)["keys"]}
    nobody = run("--endpoint", "http://127.0.0.1:9", "keys", "list")
    assert nobody.returncode == 3 and "no endpoint answers" in nobody.stderr
    garbage = run("--endpoint", "127.0.0.1:9", "keys", "list")
    assert garbage.returncode == 2 and "http(s)://" in garbage.stderr
