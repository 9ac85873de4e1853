"""`GET /v1/keys` in pages (found by the recovery bench: 100,000 keys in one reply made a
circuit record the host refuses): keys by name, `next` until the end, none lost or repeated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kmnode.api_routes import BadCall, parse_call
from kmnode.config import ClusterConfig
from kmnode.km.operator import Operator
from kmnode.km.state import encode_command
from kmnode.km_messages import ReadRequest
from kmnode.linkfaults import FaultRules
from tests.km.test_state import initialised, run


def operator_with_keys(count: int) -> Operator:
    state = initialised()
    for i in range(count):
        run(state, encode_command("key.create", name=f"k{i:04d}"))
    node = SimpleNamespace(
        enclave=SimpleNamespace(state=state),
        faults=FaultRules(1),
        config=ClusterConfig(),
        recovery=SimpleNamespace(recovering=False),
    )
    return Operator(node)  # type: ignore[arg-type]


async def test_pages_cover_every_key_once_in_name_order() -> None:
    operator = operator_with_keys(25)
    seen: list[str] = []
    after: str | None = None
    for _ in range(10):
        page = await operator.read(ReadRequest(what="keys", after=after, limit=7))
        seen += [k["name"] for k in page["keys"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [f"k{i:04d}" for i in range(25)]


async def test_a_short_list_is_one_page_with_no_next() -> None:
    page = await operator_with_keys(3).read(ReadRequest(what="keys"))
    assert [k["name"] for k in page["keys"]] == ["k0000", "k0001", "k0002"]
    assert page["next"] is None


@pytest.mark.parametrize("target", ["/v1/keys?limit=0", "/v1/keys?limit=x", "/v1/keys?limit=10001"])
def test_a_bad_limit_is_refused_naming_it(target: str) -> None:
    with pytest.raises(BadCall) as refused:
        parse_call("GET", target, b"")
    assert refused.value.field == "limit"
