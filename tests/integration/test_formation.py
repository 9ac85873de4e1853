"""Five nodes started at the same moment still form one cluster: joins are retried while
another membership change is in flight, and every node ends up an attested voter."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(180)


def test_five_nodes_started_together_form_one_cluster(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, nodes=5)
    try:
        for name in cluster.names:
            cluster.start(name)
        for name in cluster.names:
            cluster.wait_ready(name, timeout=90)
        leader = cluster.leader()
        for name in cluster.names:
            until(
                lambda n=name: cluster.status(n)["voters"] == sorted(cluster.names),
                30,
                f"{name} to see five voters",
            )
            assert cluster.status(name)["leader"] == leader
        code, reply = cluster.leader_call("POST", "/v1/keys", {"name": "k"})
        assert code == 201
        code, reply = cluster.leader_call("POST", "/v1/keys/k/release", {"node": "all"})
        assert code == 200
        assert sorted(r["node"] for r in reply["releases"]) == sorted(cluster.names)
        assert {r["status"] for r in reply["releases"]} == {"provisioned"}
    finally:
        cluster.close()
