"""The fast path of request verification (``identity._fast_verify``) accepts exactly what the
library accepts for the one form kmctl signs, and nothing else: every request it is given
that it does not accept goes to the library, which decides and says why."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.identity import (
    MAX_AGE_S,
    MAX_SKEW_S,
    AuthError,
    IdentityKeys,
    _fast_verify,
    sign_request,
    verify_request,
)

ALICE = IdentityKeys.generate("alice")
MALLORY = IdentityKeys.generate("alice")  # the same name, another key
LOOKUP = {"alice": ALICE.public(["operator"])}.get

segment = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789._~-", min_size=1, max_size=12)
paths = st.lists(segment, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
queries = st.one_of(
    st.just(""),
    st.lists(st.tuples(segment, segment), min_size=1, max_size=3).map(
        lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)
    ),
)


def present(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=paths,
    query=queries,
    body=st.binary(max_size=300),
)
def test_what_kmctl_signs_is_accepted_by_the_fast_path_and_the_library_alike(
    method: str, path: str, query: str, body: bytes
) -> None:
    target = path + query
    headers = sign_request(ALICE, method, target, body)
    fast = _fast_verify(method, target, present(headers), body, LOOKUP)
    assert fast is not None  # our signature base equals the library's, byte for byte
    assert verify_request(method, target, headers, body, LOOKUP) == fast


@settings(max_examples=100, deadline=None)
@given(
    path=paths,
    body=st.binary(min_size=1, max_size=100),
    change=st.sampled_from(
        [
            "method",
            "path",
            "query",
            "body",
            "created",
            "nonce",
            "keyid",
            "signature",
            "digest",
            "key",
        ]
    ),
)
def test_any_change_is_never_accepted_by_the_fast_path(path: str, body: bytes, change: str) -> None:
    headers = sign_request(ALICE, "POST", path, body)
    method, target = "POST", path
    signer = MALLORY if change == "key" else ALICE
    if change == "key":
        headers = sign_request(signer, "POST", path, body)
    elif change == "method":
        method = "GET"
    elif change == "path":
        target = path + "x"
    elif change == "query":
        target = path + "?a=b"
    elif change == "body":
        body = body[:-1] + bytes([body[-1] ^ 1])
    elif change == "created":
        text = headers["Signature-Input"]
        created = int(text.split("created=")[1].split(";")[0])
        headers["Signature-Input"] = text.replace(f"created={created}", f"created={created - 1}")
    elif change == "nonce":
        text = headers["Signature-Input"]
        nonce = text.split('nonce="')[1].split('"')[0]
        headers["Signature-Input"] = text.replace(nonce, "0" * len(nonce))
    elif change == "keyid":
        headers["Signature-Input"] = headers["Signature-Input"].replace('"alice"', '"alicf"')
    elif change == "signature":
        value = headers["Signature"]
        headers["Signature"] = value[:10] + ("A" if value[10] != "A" else "B") + value[11:]
    elif change == "digest":
        headers["Content-Digest"] = sign_request(ALICE, "POST", path, b"other")["Content-Digest"]
    assert _fast_verify(method, target, present(headers), body, LOOKUP) is None
    with pytest.raises(AuthError):
        verify_request(method, target, headers, body, LOOKUP)


def test_another_form_or_an_edge_of_the_age_goes_to_the_library() -> None:
    body = b"{}"
    headers = sign_request(ALICE, "POST", "/v1/keys", body)
    spaced = {**headers, "Signature-Input": headers["Signature-Input"].replace(";", "; ", 1)}
    assert _fast_verify("POST", "/v1/keys", present(spaced), body, LOOKUP) is None
    escaped = sign_request(ALICE, "GET", "/v1/keys/a%2Fb", b"")
    assert _fast_verify("GET", "/v1/keys/a%2Fb", present(escaped), b"", LOOKUP) is None
    assert verify_request("GET", "/v1/keys/a%2Fb", escaped, b"", LOOKUP).identity.name == "alice"
    old = sign_request(ALICE, "POST", "/v1/keys", body, created=time.time() - MAX_AGE_S + 0.5)
    assert _fast_verify("POST", "/v1/keys", present(old), body, LOOKUP) is None
    expired = sign_request(
        ALICE, "POST", "/v1/keys", body, created=time.time() - MAX_AGE_S - MAX_SKEW_S - 5
    )
    with pytest.raises(AuthError) as refused:
        verify_request("POST", "/v1/keys", expired, body, LOOKUP)
    assert refused.value.code == "expired"
    unknown = sign_request(IdentityKeys.generate("zed"), "POST", "/v1/keys", body)
    assert _fast_verify("POST", "/v1/keys", present(unknown), body, LOOKUP) is None
    with pytest.raises(AuthError) as refused:
        verify_request("POST", "/v1/keys", unknown, body, LOOKUP)
    assert refused.value.code == "unknown_identity"
