"""With `mqtt.url` set, nodes publish to a real mosquitto broker (CI installs it with apt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(120)


def test_node_events_and_audit_records_reach_mosquitto(mosquitto: int, tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, nodes=1, mqtt_url=f"mqtt://127.0.0.1:{mosquitto}")
    try:
        capture = cluster.start_broker_and_capture()
        assert cluster.broker is None, "no embedded broker when mqtt.url is set"
        cluster.up()
        code, _ = cluster.leader_call("POST", "/v1/keys", {"name": "k"})
        assert code == 201
        code, reply = cluster.leader_call("POST", "/v1/keys/k/release", {"node": "km1"})
        assert code == 200 and reply["releases"][0]["status"] == "provisioned"
        until(
            lambda: any(
                r.get("key") == "k" and r["status"] == "provisioned"
                for r in capture.json_on("/audit")
            ),
            15,
            "audit record on mosquitto",
        )
        events = {e["event"] for e in capture.json_on("/events")}
        assert {"node.started", "cluster.genesis"} <= events
        assert all(t.startswith("kmsim/demo/km1/") for t, _ in capture.messages)
    finally:
        cluster.close()
