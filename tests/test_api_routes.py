"""What the KM enclave makes of a request it verified: one typed request per route, or a
specific 400/404 (never an exception out of the parser)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.api_routes import ROUTES, BadCall, parse_call
from kmnode.config import LimitsSpec
from kmnode.km_messages import CreateKey, PolicyChange, Prove, ReadRequest, ReleaseKey

PROVE = b'{"key": "db", "generation": true, "challenge": %s}'


def test_each_route_builds_its_request() -> None:
    route, request = parse_call("POST", "/v1/keys", b'{"name": "db"}')
    assert (route.role, route.status, request) == ("operator", 201, CreateKey(name="db"))
    route, request = parse_call("GET", "/v1/keys/db?linearizable=1", b"")
    assert request == ReadRequest(what="key", name="db", linearizable=True)
    _, request = parse_call("POST", "/v1/keys/db/release", b'{"node": "km2", "timeout": 3}')
    assert request == ReleaseKey(key="db", node="km2", timeout=3.0)
    route, request = parse_call(
        "POST", "/v1/policy/allow", b'{"role": "service", "measurement": "' + b"ab" * 32 + b'"}'
    )
    assert route.role == "admin" and isinstance(request, PolicyChange)
    _, request = parse_call(
        "POST", "/v1/service/prove", b'{"key": "db", "generation": 1, "challenge": "00ff"}'
    )
    assert request == Prove(key="db", generation=1, challenge=b"\x00\xff")


#: Routes of data owners and users (issue 15): their acts, and the reads they share with
#: auditors (``Route.also``).
_PARTIES = ("/v1/data", "/v1/datasets")


def test_every_route_has_a_role_and_reads_need_no_more_than_auditor() -> None:
    """Every read is an auditor's, but the contract-input key and a token's sealed result:
    users read them to seal their calls' arguments and to get what only they open (and
    calling a contract is a user's act only). Data owners' and users' acts are theirs."""
    for route in ROUTES:
        users = route.path in (
            "/v1/contract-input-key",
            "/v1/contracts/{name}/calls",
            "/v1/data/tokens/{token}/result",
        )
        parties = route.path.startswith(_PARTIES)
        holders = route.path.startswith("/v1/recovery")
        if users:
            assert route.role == "user"
        elif holders and route.method == "POST":
            assert route.role == "recovery"  # only a holder submits its share
        elif parties and route.method == "POST":
            assert route.role in ("owner", "user", "operator")
        else:
            assert route.role in ("admin", "operator", "auditor")
        if route.path == "/v1/snapshot":
            # Reads no more than an auditor may, but takes a snapshot of the whole state
            # (work and memory on the node): a backup is an operator's act.
            assert route.role == "operator" and route.also == ()
            continue
        if route.method == "GET" and not users:
            assert route.role == "auditor"
            if parties:
                assert set(route.also) <= {"user", "owner"}
            elif holders:
                assert route.also == ("recovery",)  # holders read the split they hold
            else:
                assert route.also == ()


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "text"),
    [
        ("POST", "/v1/keys", b"[1]", 400, "JSON object"),
        ("POST", "/v1/keys", b"{nope", 400, "not valid JSON"),
        ("POST", "/v1/keys", b"\xff\xfe", 400, "UTF-8"),
        ("POST", "/v1/keys", b'{"a":' * 100 + b"1" + b"}" * 100, 400, "nested deeper"),
        ("POST", "/v1/policy/allow", b'{"role": "service", "measurement": "xyz"}', 400, "hex"),
        ("POST", "/v1/service/prove", PROVE % b'"0"', 400, "hex"),
        ("POST", "/v1/service/prove", PROVE % b'"00"', 400, "int"),
        ("POST", "/v1/keys/db/release", b'{"timeout": "soon"}', 400, "timeout"),
        ("POST", "/v1/keys/db/release", b'{"timeout": NaN}', 400, "timeout"),
        ("POST", "/v1/keys/db/release", b'{"timeout": Infinity}', 400, "timeout"),
        ("POST", "/v1/keys/db/release", b'{"timeout": 1e9}', 400, "timeout"),
        ("POST", "/v1/keys/db/release", b'{"timeout": true}', 400, "timeout"),
        ("GET", "/v1/nowhere", b"", 404, "no route"),
        ("POST", "/v1/keys/db", b"{}", 404, "no route"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_specifically(
    method: str, target: str, body: bytes, status: int, text: str
) -> None:
    with pytest.raises(BadCall, match=text) as caught:
        parse_call(method, target, body)
    assert caught.value.status == status


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    target=st.text(max_size=80).map(lambda t: "/v1/" + t),
    body=st.binary(max_size=200),
)
def test_garbage_gets_a_bad_call_or_a_request_never_another_exception(
    method: str, target: str, body: bytes
) -> None:
    try:
        parse_call(method, target, body)
    except BadCall as exc:
        assert exc.status in (400, 404, 413)


def test_the_body_limits_are_the_nodes_settings() -> None:
    """cluster.yaml's ``limits.api_body_bytes`` and ``api_json_depth`` bound what the KM
    enclave parses (the host refuses a larger body first; a host that does not is refused
    here): past either, a specific refusal, before any JSON is parsed."""
    tight = LimitsSpec(api_body_bytes=1024, api_json_depth=4)
    nested = b'{"name": [[[["x"]]]]}'
    with pytest.raises(BadCall, match="nested deeper than 4") as caught:
        parse_call("POST", "/v1/keys", nested, tight)
    assert caught.value.status == 400
    parse_call("POST", "/v1/keys", nested)  # within the default depth: parsed (and typed)
    large = b'{"name": "' + b"x" * 1100 + b'"}'
    with pytest.raises(BadCall, match="exceeds the limit of 1024") as caught:
        parse_call("POST", "/v1/keys", large, tight)
    assert caught.value.status == 413
