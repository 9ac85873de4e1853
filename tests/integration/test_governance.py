"""Governance on real processes: a 3-node cluster with three admins (a majority, two, passes
a proposal), an operator who may not govern, and chaos routes open only while governance says
so. Each refusal is asserted with its code, and with the state unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kmnode.identity import IdentityKeys

from .harness import LocalCluster, running, until

pytestmark = pytest.mark.timeout(240)

BEN, CAT = IdentityKeys.generate("ben"), IdentityKeys.generate("cat")
OTTO = IdentityKeys.generate("otto")
M = "ef" * 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    admins = [BEN.public(["admin"]), CAT.public(["admin"]), OTTO.public(["operator"])]
    with running(tmp_path_factory.mktemp("governance"), 3, admins) as c:
        yield c


def call(cluster: LocalCluster, path: str, body: Any, signer: Any = "admin") -> tuple[int, Any]:
    return cluster.leader_call("POST", path, body, signer)


def allowed_everywhere(cluster: LocalCluster) -> set[bool]:
    seen = set()
    for name in cluster.names:
        code, policy = cluster.api(name, "GET", "/v1/policy?linearizable=1")
        assert code == 200, policy
        seen.add(M in policy["measurements"]["service"])
    return seen


def test_a_change_needs_two_of_the_three_admins(cluster: LocalCluster) -> None:
    code, made = call(cluster, "/v1/policy/allow", {"role": "service", "measurement": M})
    assert code == 200 and made["state"] == "open", made
    assert (made["votes_for"], made["needed"]) == (["dev-admin"], 2)
    assert allowed_everywhere(cluster) == {False}
    proposal = made["proposal"]
    code, answer = call(cluster, f"/v1/proposals/{proposal}/vote", {"ballot": "for"}, OTTO)
    assert (code, answer["code"]) == (403, "forbidden"), answer
    assert allowed_everywhere(cluster) == {False}
    code, passed = call(cluster, f"/v1/proposals/{proposal}/vote", {"ballot": "for"}, BEN)
    assert code == 200 and passed["state"] == "accepted", passed
    until(lambda: allowed_everywhere(cluster) == {True}, 10, "the policy change on every node")
    code, shown = cluster.api(cluster.leader(), "GET", f"/v1/proposals/{proposal}")
    assert shown["ballots"] == {"dev-admin": "for", "ben": "for"} and shown["state"] == "accepted"


def test_a_withdrawn_proposal_cannot_pass(cluster: LocalCluster) -> None:
    code, made = call(cluster, "/v1/policy/revoke-platform", {"platform_id": "platform-2"}, CAT)
    assert code == 200 and made["state"] == "open", made
    proposal = made["proposal"]
    code, answer = call(cluster, f"/v1/proposals/{proposal}/withdraw", {}, BEN)
    assert (code, answer["code"]) == (403, "forbidden"), answer  # only its proposer
    code, answer = call(cluster, f"/v1/proposals/{proposal}/withdraw", {}, CAT)
    assert code == 200 and answer["state"] == "withdrawn", answer
    code, answer = call(cluster, f"/v1/proposals/{proposal}/vote", {"ballot": "for"}, BEN)
    assert (code, answer["code"]) == (409, "refused"), answer
    code, policy = cluster.api(cluster.leader(), "GET", "/v1/policy")
    assert "platform-2" not in policy["revoked_platforms"]


def test_chaos_needs_an_admin_and_governance(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    rule = {"peer": next(n for n in cluster.names if n != leader), "drop": 0.0}
    code, answer = cluster.api(leader, "POST", "/v1/chaos/rules", rule, signer=None)
    assert (code, answer["code"]) == (401, "unsigned"), answer
    code, answer = cluster.api(leader, "POST", "/v1/chaos/rules", rule, signer=OTTO)
    assert (code, answer["code"]) == (403, "forbidden"), answer
    code, answer = cluster.api(leader, "POST", "/v1/chaos/rules", rule)
    assert code == 200, answer
    code, made = call(
        cluster, "/v1/proposals", {"actions": [{"op": "chaos.set", "enabled": False}]}
    )
    assert made["state"] == "open"
    code, passed = call(cluster, f"/v1/proposals/{made['proposal']}/vote", {"ballot": "for"}, CAT)
    assert passed["state"] == "accepted", passed
    code, answer = cluster.api(leader, "POST", "/v1/chaos/rules", rule)
    assert (code, answer["code"]) == (404, "not_found"), answer


def test_a_member_is_removed_by_proposal(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    gone = [n for n in cluster.names if n != leader][-1]
    code, made = call(cluster, "/v1/members/remove", {"name": gone})
    assert code == 200 and made["state"] == "open", made
    code, members = cluster.api(leader, "GET", "/v1/members")
    assert gone in {m["name"] for m in members["members"]} and gone in members["voters"]
    code, passed = call(cluster, f"/v1/proposals/{made['proposal']}/vote", {"ballot": "for"}, BEN)
    assert passed["state"] == "accepted", passed

    def removed() -> bool:
        _, members = cluster.api(cluster.leader(), "GET", "/v1/members")
        return gone not in {m["name"] for m in members["members"]} and gone not in members["voters"]

    until(removed, 15, f"{gone} out of the members and the voters")


def test_each_proposal_state_is_an_audit_record_and_an_event(cluster: LocalCluster) -> None:
    assert cluster.capture is not None

    def published() -> bool:
        states = {(r.get("proposal"), r.get("state")) for r in cluster.capture.json_on("/audit")}
        return {"open", "accepted", "withdrawn"} <= {s for _, s in states}

    until(published, 10, "proposal audit records on MQTT")
    audited = [r for r in cluster.capture.json_on("/audit") if "proposal" in r]
    accepted = [r for r in audited if r["state"] == "accepted"]
    assert accepted and all(len(r["votes_for"]) >= r["needed"] for r in accepted)
    # Published once per change, by the leader that applied it (not once per node).
    keys = [(r["proposal"], r["state"], tuple(r["votes_for"])) for r in audited]
    assert len(keys) == len(set(keys))
    kinds = {e.get("event") for e in cluster.capture.json_on("/events")}
    assert {"proposal.open", "proposal.accepted", "proposal.withdrawn"} <= kinds
