"""The OpenAPI document of the operator API: a valid OpenAPI 3.1 document, every route in it
with its method, its signature and its statuses, and no route left out of it."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from openapi_spec_validator import validate

from kmnode import openapi
from kmnode.api_routes import CHAOS_ROUTES, OPENAPI_PATH, ROUTES, BadCall, Route, parse_call
from kmnode.host.api import _STATUS
from kmnode.km_messages import FailureCode
from kmnode.openapi import OPEN_ROUTES, SHIPPED, UndocumentedRoute, check_documented, document


def operation(method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = document()["paths"][path][method.lower()]
    return op


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises OpenAPIValidationError naming what is wrong
    json.dumps(doc)  # what the host serves: JSON, nothing else


def test_every_route_is_documented_with_its_method_and_success() -> None:
    doc = document()
    for route in (*ROUTES, *CHAOS_ROUTES):
        op = operation(route.method, route.path)
        assert str(route.status) in op["responses"], route
        refs = [p.get("$ref", "") for p in op["parameters"]]
        assert refs[-2:] == [
            "#/components/parameters/SignatureInput",
            "#/components/parameters/ContentDigest",
        ], route
        assert "security" not in op  # the document's default: signed
    assert doc["security"] == [{"httpMessageSignature": []}]
    for method, path in OPEN_ROUTES:
        assert operation(method, path)["security"] == []
    served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == {(r.method, r.path) for r in (*ROUTES, *CHAOS_ROUTES)} | set(OPEN_ROUTES)


def test_a_route_added_without_documentation_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    check_documented()  # the real tables: every route documented, no stale entry
    new = Route("POST", "/v1/keys/{name}/archive", "operator", ROUTES[0].build)
    monkeypatch.setattr(openapi, "ROUTES", (*ROUTES, new))
    with pytest.raises(UndocumentedRoute, match=r"archive"):
        check_documented()
    monkeypatch.setattr(openapi, "ROUTES", ROUTES[1:])
    with pytest.raises(UndocumentedRoute, match=r"without a route: \[\('GET', '/v1/keys'\)\]"):
        check_documented()
    # Documented, but with a path parameter whose type nobody gave.
    peer = Route("GET", "/v1/peers/{peer}", "auditor", ROUTES[0].build)
    monkeypatch.setattr(openapi, "ROUTES", (*ROUTES, peer))
    monkeypatch.setitem(openapi.DOCS, ("GET", peer.path), openapi.DOCS[("GET", "/v1/keys")])
    with pytest.raises(UndocumentedRoute, match=r"path parameters without a type.*'peer'"):
        check_documented()


def test_every_status_the_host_maps_a_failure_to_is_documented_with_the_error_shape() -> None:
    components = document()["components"]
    for code in get_args(FailureCode):
        assert str(_STATUS[code]) in components["responses"], code
    error = components["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"error", "code"}
    codes = {c for branch in error["properties"]["code"]["anyOf"] for c in branch["enum"]}
    assert set(get_args(FailureCode)) <= codes
    assert {"unsupported_media_type", "bad_host", "bad_origin"} <= codes


def test_writes_document_the_leader_redirect_and_json_only_and_reads_do_not() -> None:
    for route in ROUTES:
        responses = operation(route.method, route.path)["responses"]
        if route.method == "POST":
            assert {"409", "415", "421"} <= responses.keys(), route
            assert operation(route.method, route.path)["requestBody"]["required"] is True
        else:
            assert "415" not in responses and "409" not in responses, route
    assert "404" in operation("GET", "/v1/keys/{name}")["responses"]
    assert "404" in operation("POST", "/v1/chaos/heal")["responses"]  # chaos not enabled
    assert set(operation("GET", OPENAPI_PATH)["responses"]) == {"200", "403"}


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document()["components"]["schemas"][name]
    return schema


def test_bodies_carry_the_constraints_of_the_commands_they_become() -> None:
    """The documented constraints are the ones the enclave enforces: a body at the edge of
    the document is accepted by the parser, one past it is refused."""
    name = _schema("CreateKeyBody")["properties"]["name"]
    assert name["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    timeout = _schema("ReleaseBody")["properties"]["timeout"]
    assert (timeout["minimum"], timeout["maximum"]) == (0, 300)
    assert parse_call("POST", "/v1/keys/db/release", b'{"timeout": 300}')
    with pytest.raises(BadCall, match="timeout"):
        parse_call("POST", "/v1/keys/db/release", b'{"timeout": 300.5}')
    challenge = _schema("ProveBody")["properties"]["challenge"]
    at_most = json.dumps({"key": "db", "generation": 1, "challenge": "ab" * 1024})
    assert challenge["maxLength"] == 2048
    assert parse_call("POST", "/v1/service/prove", at_most.encode())
    with pytest.raises(BadCall, match="challenge"):
        parse_call("POST", "/v1/service/prove", at_most.replace('"ab', '"abab').encode())
    actions = _schema("ProposeBody")["properties"]["actions"]
    assert (actions["minItems"], actions["maxItems"]) == (1, 16)
    ops = set(actions["items"]["discriminator"]["mapping"])
    assert {"policy.allow", "member.remove", "identity.set", "chaos.set", "node.admit"} <= ops


def test_the_shipped_document_is_the_built_one() -> None:
    """The host serves ``kmnode/openapi.json`` (it does not import the builder, which reads the
    KM enclave's types); after a change to a route or a type, `python -m kmnode.openapi`."""
    assert SHIPPED.read_text() == openapi.render(), "run: python -m kmnode.openapi"
