"""Monitoring on real processes (issue 17): `/v1/health` answers 503 with the reason until
the node has joined and 200 after, `/v1/health/live` 200 throughout; `/metrics` parses as
Prometheus text and its release and Raft series move when releases happen."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(240)


def get(cluster: LocalCluster, name: str, path: str) -> tuple[int, bytes, str]:
    node = cluster.config.node(name)
    url = f"http://{node.host}:{node.api_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def health(cluster: LocalCluster, name: str, path: str = "/v1/health") -> tuple[int, Any]:
    code, body, _ = get(cluster, name, path)
    return code, json.loads(body)


def samples(
    cluster: LocalCluster, name: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body, kind = get(cluster, name, "/metrics")
    assert code == 200 and kind.startswith("text/plain"), (code, kind)
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def api_up(cluster: LocalCluster, name: str) -> bool:
    try:
        return get(cluster, name, "/v1/health/live")[0] == 200
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("observe"), 3)
    try:
        c.start_broker_and_capture()
        yield c
    finally:
        c.close()


def test_health_follows_the_join_and_metrics_move_with_releases(cluster: LocalCluster) -> None:
    # km2 first: it cannot join before the cluster's first node runs.
    cluster.start("km2")
    until(lambda: api_up(cluster, "km2"), 60, "km2's API")
    code, answer = health(cluster, "km2")
    assert code == 503 and answer["status"] == "not_ready", answer
    assert "not joined" in answer["reason"] or "no leader" in answer["reason"], answer
    assert health(cluster, "km2", "/v1/health/live")[0] == 200
    before_join = samples(cluster, "km2")
    assert before_join[("kmsim_ready", ())] == 0.0

    cluster.start("km1")
    cluster.wait_ready("km1")
    cluster.start("km3")
    for name in ("km2", "km3"):
        cluster.wait_ready(name)
    until(lambda: health(cluster, "km2")[0] == 200, 30, "km2 healthy")
    assert health(cluster, "km2")[1]["leader"]

    leader = cluster.leader()
    before = samples(cluster, leader)
    assert cluster.leader_call("POST", "/v1/keys", {"name": "watched"})[0] == 201
    for _ in range(3):
        code, reply = cluster.leader_call("POST", "/v1/keys/watched/release", {"node": "all"})
        assert code == 200, reply
    after = samples(cluster, leader)
    provisioned = ("kmsim_releases_total", (("outcome", "provisioned"), ("reason", "none")))
    assert after[provisioned] - before.get(provisioned, 0.0) == 9
    latency = ("kmsim_release_latency_seconds_count", ())
    assert after[latency] - before.get(latency, 0.0) >= 9
    assert after[("kmsim_raft_commit_index", ())] > before[("kmsim_raft_commit_index", ())]
    assert after[("kmsim_raft_is_leader", ())] == 1.0
    assert after[("kmsim_keys", ())] == before[("kmsim_keys", ())] + 1
    assert after[("kmsim_km_enclave_up", ())] == 1.0
    assert (
        after[("kmsim_host_fsync_seconds_count", ())]
        > before[("kmsim_host_fsync_seconds_count", ())]
    )
    published = ("kmsim_mqtt_messages_total", (("outcome", "published"),))
    until(lambda: samples(cluster, leader)[published] > before[published], 20, "MQTT counts moving")


def test_json_logs_parse_and_carry_node_component_and_level(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cluster = LocalCluster(tmp_path_factory.mktemp("jsonlogs"), 1)
    try:
        cluster.start_broker_and_capture()
        cluster.start("km1", env={"KMSIM_LOG_FORMAT": "json", "KMSIM_LOG_LEVEL": "debug"})
        cluster.wait_ready("km1")
        assert cluster.leader_call("POST", "/v1/keys", {"name": "logged"})[0] == 201
        code, reply = cluster.leader_call("POST", "/v1/keys/logged/release", {"node": "km1"})
        assert code == 200, reply
    finally:
        cluster.close()
    lines = (cluster.logs / "km1.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert records and all(r["node"] == "km1" and r["level"] for r in records)
    components = {r["component"] for r in records}
    assert {"host", "km"} <= components <= {"host", "km", "service"}
    assert any(r["level"] == "DEBUG" for r in records)
    assert all({"time", "logger", "message"} <= r.keys() for r in records)
