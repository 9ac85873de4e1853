"""The operator API fuzzed against its own OpenAPI document, on a live node: schemathesis
generates requests from the document the node serves (``/v1/openapi.json``), valid ones and
invalid ones, and every answer must be documented (its status, its content type, its body's
schema) and none may be a server error.

Two runs: signed as the cluster's admin (every request signed as kmctl signs it, so the
generated requests reach the KM enclave's parser and state machine), and unsigned (every
signed route must refuse it, before anything is parsed). The chaos routes are left out of the
signed run, but for the link rules (a one-node cluster has no peer link to fault): injecting
faults into the node under test (a stalled ring, a killed service enclave, garbage on its
inputs) is their job, and their answers would be the faults', not the API's. Hypothesis runs
a bounded number of examples, no shrinking, no example database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.schemas import BaseSchema

from kmnode.api_routes import OPENAPI_PATH
from kmnode.identity import IdentityKeys, sign_request
from kmnode.openapi import OPEN_ROUTES, document

from .harness import LocalCluster, cluster_admin, running

pytestmark = pytest.mark.timeout(300)

#: Examples per run (across every operation): enough to reach each route several times with
#: valid and invalid data, few enough for about a minute on a loaded machine.
EXAMPLES = 500
#: The chaos routes that would inject a fault into the node under test (the link rules of a
#: one-node cluster reach no peer: they are fuzzed like the rest).
INJECTS_FAULTS = r"^/v1/chaos/(ring-stall|service-crash|poison)$"
#: The key the node has before the fuzz starts.
KEY = "db"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)


class Signed(requests.auth.AuthBase):
    """Signs each request as it is sent (its method, path with query, and body bytes exactly as
    they go on the wire), as kmctl does: what schemathesis generates is what gets signed."""

    def __init__(self, keys: IdentityKeys) -> None:
        self.keys = keys

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        data = body.encode() if isinstance(body, str) else body
        assert isinstance(data, bytes), type(body)
        assert request.method is not None
        request.headers.update(sign_request(self.keys, request.method, request.path_url, data))
        return request


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("fuzz"), 1) as c:
        code, body = c.api("km1", "POST", "/v1/keys", {"name": KEY})
        assert code == 201, body
        yield c


def base_url(cluster: LocalCluster) -> str:
    spec = cluster.config.node("km1")
    return f"http://{spec.host}:{spec.api_port}"


def served_schema(cluster: LocalCluster) -> BaseSchema:
    """The document as the node serves it (unsigned, like /v1/status)."""
    schema = schemathesis.openapi.from_url(base_url(cluster) + OPENAPI_PATH, timeout=30)
    return schema


def fuzz(schema: BaseSchema, url: str, session: requests.Session) -> list[tuple[str, int]]:
    """Run the bounded fuzz; every answer is checked as it comes. Returns (operation, status)."""
    seen: list[tuple[str, int]] = []

    # Valid and invalid requests to every route, and valid ones about a key that exists (a
    # generated name seldom names one): rotations, releases, reads of it.
    cases = (
        schema.as_strategy(GenerationMode.POSITIVE)
        | schema.as_strategy(GenerationMode.NEGATIVE)
        | schema.include(path_regex=r"^/v1/keys/\{name\}").as_strategy(
            path_parameters={"name": KEY}
        )
    )

    @FUZZ
    @given(case=cases)
    def run(case: Case[Any]) -> None:
        response = case.call(base_url=url, session=session, timeout=60)
        seen.append((case.operation.label, response.status_code))
        case.validate_response(response, checks=CHECKS)

    run()
    return seen


def test_the_node_serves_the_document_unsigned(node: LocalCluster) -> None:
    code, served = node.api("km1", "GET", OPENAPI_PATH, signer=None)
    assert code == 200
    assert served == json.loads(json.dumps(document()))


def test_signed_requests_get_documented_answers_and_no_server_error(node: LocalCluster) -> None:
    schema = served_schema(node).exclude(path_regex=INJECTS_FAULTS)
    session = requests.Session()
    session.auth = Signed(cluster_admin(node.root))
    seen = fuzz(schema, base_url(node), session)
    statuses = {status for _, status in seen}
    operations = {label for label, _ in seen}
    # The signed run reached the enclave: some requests were served, some refused as invalid.
    assert any(200 <= s < 300 for s in statuses), sorted(statuses)
    assert statuses & {400, 404, 409}, sorted(statuses)
    assert len(operations) >= 15, sorted(operations)
    code, status = node.api("km1", "GET", "/v1/status")
    assert code == 200 and status["ready"], status


def test_unsigned_requests_are_refused_with_documented_answers(node: LocalCluster) -> None:
    schema = served_schema(node)
    seen = fuzz(schema, base_url(node), requests.Session())
    open_labels = {f"{method} {path}" for method, path in OPEN_ROUTES}
    signed = [(label, status) for label, status in seen if label not in open_labels]
    assert signed, "the fuzz reached no signed route"
    # Refused before it was parsed: unsigned (401), or not JSON / too large to relay.
    allowed: set[Any] = {401, 400, 413, 415}
    assert {status for _, status in signed} <= allowed, sorted(set(signed))
    assert any(status == 401 for _, status in signed)
