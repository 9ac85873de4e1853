"""The KM enclave's answer to a request no identity of its state can have signed: a node
that has not joined yet, and a cluster from before identities, each say so and what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kmnode.config import ClusterConfig
from kmnode.identity import PublicIdentity
from kmnode.km.operator import Operator
from kmnode.km.state import KMState, encode_command
from kmnode.km_messages import Failed
from kmnode.linkfaults import FaultRules
from tests.km.test_state import POLICY, member
from tests.operators import ADMIN, api_call


def operator_with(state: KMState) -> Operator:
    node = SimpleNamespace(
        enclave=SimpleNamespace(state=state),
        faults=FaultRules(1),
        config=ClusterConfig(),
        recovery=SimpleNamespace(recovering=False),
    )
    return Operator(node)  # type: ignore[arg-type]


async def refusal(state: KMState) -> tuple[str, str]:
    with pytest.raises(Failed) as caught:
        await operator_with(state).call(api_call("GET", "/v1/keys"))
    return caught.value.failure.code, caught.value.failure.message


async def test_a_node_that_has_not_joined_says_so() -> None:
    code, message = await refusal(KMState())
    assert code == "unknown_identity" and "has not joined its cluster yet" in message


async def test_a_cluster_from_before_identities_says_how_to_recover() -> None:
    legacy = KMState()
    legacy.apply(
        1,
        encode_command("cluster.init", cluster="demo", policy=POLICY, member=member("km1", 7101)),
    )
    code, message = await refusal(legacy)
    assert code == "unknown_identity" and "recreate it" in message


class _Leader:
    """A leader that records what would be proposed (nothing, for a malformed request)."""

    is_leader = True
    leader = "km1"

    def __init__(self) -> None:
        self.proposed: list[bytes] = []


def leader_with(state: KMState) -> tuple[Operator, _Leader]:
    driver = _Leader()

    async def propose(data: bytes, timeout: float) -> object:
        driver.proposed.append(data)
        raise AssertionError("a malformed request was proposed")

    node = SimpleNamespace(
        name="km1",
        enclave=SimpleNamespace(state=state),
        faults=FaultRules(1),
        config=ClusterConfig(),
        ready=True,
        driver=driver,
        propose=propose,
        recovery=SimpleNamespace(recovering=False),
    )
    return Operator(node), driver  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "body", "field"),
    [
        ("/v1/keys", {"name": 5}, "name"),
        ("/v1/keys", {"name": "a" * 65}, "name"),
        ("/v1/keys", {"name": "db", "allowed_service": ["zz"]}, "allowed_service.0"),
        ("/v1/keys/db/release", {"node": "km1", "generation": True}, "generation"),
        ("/v1/keys/db/release", {"node": "km1", "generation": 0}, "generation"),
        ("/v1/keys/db/release", {"node": ["km1"]}, "node"),
        (
            "/v1/proposals",
            {"actions": [{"op": "policy.allow", "role": "km", "measurement": "zz"}]},
            "actions.0.policy.allow.measurement",
        ),
        ("/v1/proposals", {"actions": [{"op": "constitution.set", "threshold": 1.5}]}, None),
    ],
)
async def test_a_malformed_request_is_a_400_naming_the_field_and_nothing_is_proposed(
    target: str, body: dict[str, object], field: str | None
) -> None:
    """The checks the state machine makes on a committed command run before proposing it, so
    the operator learns which field is wrong at once, and the log never sees the request."""
    state = genesis_with_admin()
    before = state.snapshot()
    operator, driver = leader_with(state)
    with pytest.raises(Failed) as caught:
        await operator.call(api_call("POST", target, body))
    failure = caught.value.failure
    assert failure.code == "bad_request", failure
    if field is not None:
        assert failure.field == field, failure
    assert failure.field and failure.field.split(".")[0] in failure.message
    assert driver.proposed == [] and state.snapshot() == before


def genesis_with_admin() -> KMState:
    state = KMState()
    result = state.apply(
        1,
        encode_command(
            "cluster.init",
            cluster="demo",
            policy=POLICY,
            member=member("km1", 7101),
            identities=[with_roles().model_dump(mode="json")],
        ),
    )
    assert result.ok, result
    return state


def with_roles() -> PublicIdentity:
    return ADMIN.public(["admin", "operator", "auditor"])


REGISTER = {
    "name": "d", "digest_ct": "0" * 64, "digest_pt": "0" * 64, "size": 1, "privacy": "high",
    "ops": ["mean"], "wrapped_key": "A" * 108,
}  # fmt: skip


@pytest.mark.parametrize(
    ("target", "body", "text"),
    [
        ("/v1/datasets/d/computations", {"auth": {"by": "someone-else"}}, "'auth'"),
        ("/v1/datasets/d/computations", {"op": "key.create"}, "'op'"),
        ("/v1/datasets/d/grants", {"user": "bob", "ops": ["mean"], "uses": 0, "ttl": 9}, "uses"),
        ("/v1/datasets/d/grants", {"user": "bob", "ops": [], "uses": 1, "ttl": 9}, "ops"),
        (
            "/v1/datasets/d/grants",
            {"user": "bob", "ops": ["mean"], "uses": 1, "ttl": 9, "extra": True},
            "extra",
        ),
        (
            "/v1/datasets/d/computations",
            {"operation": "mean", "params": "zz", "sealed": "A" * 64, "nonce": "0" * 32},
            "params",
        ),
        ("/v1/datasets", {**REGISTER, "size": -1}, "size"),
        ("/v1/datasets", {"name": "D!", "digest_ct": "0" * 64}, "name"),
    ],
)
async def test_a_malformed_data_request_is_refused_before_anything_is_proposed(
    target: str, body: dict[str, object], text: str
) -> None:
    """A data owner's or user's request that is not one of the commands (a field the signer
    may not set, a value out of range, an unknown field) is a 400 naming it, and the log never
    sees it: nobody can smuggle another signer or another operation in through the body."""
    state = KMState()
    party = ADMIN.public(["admin", "owner", "user"])
    init = encode_command(
        "cluster.init", cluster="demo", policy=POLICY, member=member("km1", 7101),
        identities=[party.model_dump(mode="json")],
    )  # fmt: skip
    assert state.apply(1, init).ok
    before = state.snapshot()
    operator, driver = leader_with(state)
    with pytest.raises(Failed) as caught:
        await operator.call(api_call("POST", target, body))
    failure = caught.value.failure
    assert failure.code == "bad_request" and text in failure.message, failure
    assert driver.proposed == [] and state.snapshot() == before
