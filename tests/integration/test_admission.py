"""Admission on real processes: a 3-node cluster with three admins (two of three pass a
proposal). A fourth node that attests stays pending, with no master secret, until a passed
proposal admits it; then it joins at the addresses it was admitted with and keys are released
to it; a proposal removes it; and after a rejected proposal to admit it again it is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kmnode.identity import IdentityKeys

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(240)

BEN, CAT = IdentityKeys.generate("ben"), IdentityKeys.generate("cat")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(
        tmp_path_factory.mktemp("admission"),
        nodes=4,
        identities=[BEN.public(["admin"]), CAT.public(["admin"])],
    )
    # Genesis knows three nodes (cluster.yaml lists km4 only later, as an operator adds one).
    full = c.config_path.read_text()
    first_three = yaml.safe_load(full)
    first_three["nodes"] = first_three["nodes"][:3]
    c.config_path.write_text(yaml.safe_dump(first_three))
    try:
        c.start_broker_and_capture()
        for name in ("km1", "km2", "km3"):
            c.start(name)
            c.wait_ready(name)
        c.config_path.write_text(full)
        yield c
    finally:
        c.close()


def vote(cluster: LocalCluster, proposal: str, who: IdentityKeys, ballot: str = "for") -> Any:
    code, answer = cluster.leader_call(
        "POST", f"/v1/proposals/{proposal}/vote", {"ballot": ballot}, who
    )
    assert code == 200, answer
    return answer


def members(cluster: LocalCluster) -> set[str]:
    code, answer = cluster.leader_call("GET", "/v1/members")
    assert code == 200, answer
    return {m["name"] for m in answer["members"]}


def test_a_joining_node_stays_pending_until_a_proposal_admits_it(cluster: LocalCluster) -> None:
    cluster.start("km4")
    until(lambda: cluster.status("km4") is not None, 30, "km4's API")
    admit = {"op": "node.admit", "member": cluster.config.node("km4").member_record()}
    code, made = cluster.leader_call("POST", "/v1/proposals", {"actions": [admit]})
    assert code == 201 and made["state"] == "open", made
    # Pending: it attested (its quote passes the policy), it got nothing.
    for _ in range(3):
        status = cluster.status("km4")
        assert status is not None and not status["ready"] and not status["has_master_secret"]
        assert "km4" not in members(cluster)
    assert vote(cluster, made["proposal"], BEN)["state"] == "accepted"
    cluster.wait_ready("km4", 60)
    status = cluster.status("km4")
    assert status is not None and status["has_master_secret"]
    code, listed = cluster.leader_call("GET", "/v1/members")
    km4 = next(m for m in listed["members"] if m["name"] == "km4")
    assert (km4["host"], km4["peer_port"]) == (
        cluster.config.node("km4").host,
        cluster.config.node("km4").peer_port,
    )
    assert "km4" in listed["voters"]


def test_keys_are_released_to_the_admitted_node(cluster: LocalCluster) -> None:
    code, answer = cluster.leader_call("POST", "/v1/keys", {"name": "late"})
    assert code == 201, answer
    code, answer = cluster.leader_call("POST", "/v1/keys/late/release", {"node": "km4"})
    assert code == 200, answer
    assert [r["status"] for r in answer["releases"]] == ["provisioned"]


def test_removed_by_proposal_then_refused_after_a_rejected_admission(
    cluster: LocalCluster,
) -> None:
    code, made = cluster.leader_call("POST", "/v1/members/remove", {"name": "km4"})
    assert code == 200 and made["state"] == "open", made
    assert vote(cluster, made["proposal"], CAT)["state"] == "accepted"
    until(lambda: "km4" not in members(cluster), 15, "km4 out of the members")
    cluster.stop("km4")
    shutil.rmtree(cluster.config.state_dir / "nodes" / "km4")
    admit = {"op": "node.admit", "member": cluster.config.node("km4").member_record()}
    code, made = cluster.leader_call("POST", "/v1/proposals", {"actions": [admit]})
    assert code == 201 and made["state"] == "open", made
    vote(cluster, made["proposal"], BEN, "against")
    assert vote(cluster, made["proposal"], CAT, "against")["state"] == "rejected"
    cluster.start("km4")
    proc = cluster.procs["km4"]
    until(lambda: proc.poll() is not None, 60, "km4 to be refused and stop")
    assert proc.returncode == 1
    assert "was rejected" in cluster.log_tail("km4", 40)
    assert "km4" not in members(cluster)
