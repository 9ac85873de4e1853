"""The operator API's side of the circuit, attacked as a caller would: garbage bodies, deep
nesting, NaN and huge timeouts, wrong types. Each gets a specific 400 and nothing reaches the
KM enclave; what the enclave refuses comes back with the status its failure code names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kmnode.config import ClusterConfig
from kmnode.host.api import OperatorApi
from kmnode.host.faults import RingStall
from kmnode.km_messages import DataReply, Failed, ReleaseKey, Reply, Request


class FakeKM:
    """Stands in for the circuit: records what reaches it, answers or refuses."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.refusal: Failed | None = None

    async def call(self, request: Request, reply_type: type[Reply]) -> Reply:
        self.seen.append(request)
        if self.refusal is not None:
            raise self.refusal
        if isinstance(request, ReleaseKey):
            return DataReply(data={"releases": []})
        return DataReply(data={"key": "k", "generation": 1})


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient[Any, Any], FakeKM]]:
    km = FakeKM()
    node = SimpleNamespace(
        name="km1", config=ClusterConfig.default(3), km=km, ring_stall=RingStall()
    )
    client: TestClient[Any, Any] = TestClient(
        TestServer(OperatorApi(node).app(), host="127.0.0.1", port=0)  # type: ignore[arg-type]
    )
    await client.start_server()
    try:
        yield client, km
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/keys/db/release", '{"timeout": NaN}', "timeout"),
        ("/v1/keys/db/release", '{"timeout": Infinity}', "timeout"),
        ("/v1/keys/db/release", '{"timeout": 1e9}', "timeout"),
        ("/v1/keys/db/release", '{"timeout": "soon"}', "timeout"),
        ("/v1/keys/db/release", '{"timeout": true}', "timeout"),
        ("/v1/keys", "[" * 20_000 + "]" * 20_000, None),  # under the 64 KiB body limit
        ("/v1/keys", "not json", None),
        ("/v1/keys", "[1, 2]", None),
    ],
    ids=["nan", "infinity", "huge", "string", "bool", "deep", "garbage", "array"],
)
async def test_bad_bodies_get_a_specific_400_and_reach_nothing(
    api: tuple[TestClient[Any, Any], FakeKM], path: str, body: str, field: str | None
) -> None:
    client, km = api
    response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["code"] == "bad_request"
    if field is not None:
        assert field in answer["error"] and answer.get("field") == field
    assert km.seen == []


async def test_a_good_release_reaches_the_enclave_typed(
    api: tuple[TestClient[Any, Any], FakeKM],
) -> None:
    client, km = api
    response = await client.post("/v1/keys/db/release", json={"node": "km2", "timeout": 3})
    assert response.status == 200
    assert km.seen == [ReleaseKey(key="db", node="km2", timeout=3.0)]


@pytest.mark.parametrize(
    ("code", "status"),
    [("refused", 409), ("not_leader", 421), ("timeout", 504), ("not_ready", 503)],
)
async def test_the_enclaves_refusals_map_to_their_status(
    api: tuple[TestClient[Any, Any], FakeKM], code: str, status: int
) -> None:
    client, km = api
    km.refusal = Failed.of(code, "because", leader="km2", leader_api="http://127.0.0.1:7202")  # type: ignore[arg-type]
    response = await client.post("/v1/keys", json={"name": "db"})
    answer = await response.json()
    assert response.status == status and answer["code"] == code
    if code == "not_leader":
        assert answer["leader"] == "km2" and answer["leader_api"] == "http://127.0.0.1:7202"
