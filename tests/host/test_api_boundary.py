"""The operator API's side of the circuit, attacked as a caller (or a web page) would: a body
that is not JSON gets a 415 and reaches nothing; a request reaches the KM enclave exactly as it
was signed, with the signature headers and nothing else; what the enclave refuses comes back
with the status its failure code names. (What the enclave makes of a body: test_api_routes.)"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kmnode.config import ClusterConfig
from kmnode.host.api import OperatorApi
from kmnode.host.blob_host import BlobHost
from kmnode.host.contract_host import ContractHost
from kmnode.host.faults import RingStall
from kmnode.km_messages import ApiCall, DataReply, Failed, Reply, Request
from tests.ports import free_port


class FakeKM:
    """Stands in for the circuit: records what reaches it, answers or refuses."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.refusal: Failed | None = None

    async def call(self, request: Request, reply_type: type[Reply]) -> Reply:
        self.seen.append(request)
        if self.refusal is not None:
            raise self.refusal
        return DataReply(data={"key": "k", "generation": 1})


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], FakeKM]]:
    km = FakeKM()
    contracts = ContractHost(tmp_path, fsync=False)
    port = free_port()
    config = ClusterConfig.default(3)
    nodes = [config.nodes[0].model_copy(update={"api_port": port}), *config.nodes[1:]]
    node = SimpleNamespace(
        name="km1",
        config=config.model_copy(update={"nodes": nodes}),
        km=km,
        ring_stall=RingStall(),
        poisoner=None,
        contracts=contracts,
        blobs=BlobHost(tmp_path),
    )
    client: TestClient[Any, Any] = TestClient(
        TestServer(OperatorApi(node).app(), host="127.0.0.1", port=port)  # type: ignore[arg-type]
    )
    await client.start_server()
    try:
        yield client, km
    finally:
        await client.close()
        contracts.close()


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "text/plain"}, b'{"name": "db"}'),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"name=db"),
        ({}, b'{"name": "db"}'),
    ],
    ids=["text-plain", "form", "no-type"],
)
async def test_a_post_that_is_not_json_is_refused_and_reaches_nothing(
    api: tuple[TestClient[Any, Any], FakeKM], headers: dict[str, str], body: bytes
) -> None:
    """What a web page can send across origins without a preflight (text/plain, a form)."""
    client, km = api
    response = await client.post("/v1/keys", data=body, headers=headers)
    answer = await response.json()
    assert response.status == 415 and answer["code"] == "unsupported_media_type"
    assert km.seen == []


async def test_a_request_reaches_the_enclave_as_signed_with_only_the_signature_headers(
    api: tuple[TestClient[Any, Any], FakeKM],
) -> None:
    client, km = api
    body = b'{"node": "km2", "timeout": 3}'
    signature = {"Signature": "kmsim=:AA==:", "Signature-Input": "kmsim=()", "Content-Digest": "x"}
    response = await client.post(
        "/v1/keys/db/release?wait=1",
        data=body,
        headers={"Content-Type": "application/json", "Cookie": "session=1", **signature},
    )
    assert response.status == 200
    assert km.seen == [
        ApiCall(
            method="POST",
            target="/v1/keys/db/release?wait=1",
            headers={k.lower(): v for k, v in signature.items()},
            body=body,
        )
    ]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("refused", 409),
        ("not_leader", 421),
        ("timeout", 504),
        ("not_ready", 503),
        ("unsigned", 401),
        ("bad_signature", 401),
        ("unknown_identity", 401),
        ("expired", 401),
        ("forbidden", 403),
        ("replay", 409),
    ],
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


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Host": "attacker.example:80"}, "bad_host"),  # DNS rebinding: a foreign name
        ({"Origin": "http://attacker.example"}, "bad_origin"),  # another site's page
        ({"Origin": "null"}, "bad_origin"),
    ],
    ids=["host", "origin", "null-origin"],
)
async def test_a_foreign_host_or_origin_is_refused_and_reaches_nothing(
    api: tuple[TestClient[Any, Any], FakeKM], headers: dict[str, str], code: str
) -> None:
    client, km = api
    for method, path in (("POST", "/v1/keys"), ("GET", "/v1/keys"), ("GET", "/v1/status")):
        response = await client.request(
            method, path, json={} if method == "POST" else None, headers=headers
        )
        answer = await response.json()
        assert (response.status, answer["code"]) == (403, code), answer
    assert km.seen == []


async def test_this_nodes_own_origin_and_localhost_are_accepted(
    api: tuple[TestClient[Any, Any], FakeKM],
) -> None:
    client, km = api
    port = client.port
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Host": f"localhost:{port}"}):
        response = await client.post("/v1/keys", json={"name": "db"}, headers=headers)
        assert response.status == 201, await response.text()
    assert len(km.seen) == 2


async def test_an_oversized_request_is_refused_at_the_host_and_reaches_nothing(
    api: tuple[TestClient[Any, Any], FakeKM],
) -> None:
    client, km = api
    response = await client.get("/v1/keys?x=" + "a" * 5000)
    answer = await response.json()
    assert (response.status, answer["code"]) == (400, "bad_request"), answer
    assert "too large" in answer["error"]
    oversized = await client.post("/v1/keys", json={"name": "x" * (70 * 1024)})
    assert oversized.status == 413
    assert km.seen == []


async def test_a_blob_is_stored_only_under_its_own_digest_and_within_its_bound(
    api: tuple[TestClient[Any, Any], FakeKM], tmp_path: Path
) -> None:
    client, km = api
    blob = b"ciphertext" * 100
    digest = hashlib.sha256(blob).hexdigest()
    wrong = await client.put(f"/v1/node/data/blobs/{'0' * 64}", data=blob)
    assert wrong.status == 400 and "do not hash" in (await wrong.json())["error"]
    bad = await client.put("/v1/node/data/blobs/..%2Fetc", data=blob)
    assert bad.status in (400, 404)
    stored = await client.put(f"/v1/node/data/blobs/{digest}", data=blob)
    assert stored.status == 201 and (await stored.json())["stored"] is True
    again = await client.put(f"/v1/node/data/blobs/{digest}", data=blob)
    assert again.status == 200 and (await again.json())["stored"] is False
    huge = await client.put(f"/v1/node/data/blobs/{'1' * 64}", data=b"x" * ((16 << 20) + 1))
    assert huge.status == 413
    listed = await (await client.get("/v1/node/data/blobs")).json()
    assert listed == {"blobs": [digest]}
    assert km.seen == []  # the host answered alone: nothing reached the enclave
