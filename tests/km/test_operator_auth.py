"""The KM enclave's answer to a request no identity of its state can have signed: a node
that has not joined yet, and a cluster from before identities, each say so and what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kmnode.km.operator import Operator
from kmnode.km.state import KMState, encode_command
from kmnode.km_messages import Failed
from kmnode.linkfaults import FaultRules
from tests.km.test_state import POLICY, member
from tests.operators import api_call


def operator_with(state: KMState) -> Operator:
    node = SimpleNamespace(enclave=SimpleNamespace(state=state), faults=FaultRules(1))
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
