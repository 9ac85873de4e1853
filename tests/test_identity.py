"""Operator identities: key files, and the request signatures the KM enclave verifies.

Every test an attacker would try against a signed request: no signature, a changed body,
path, query or method, another key under the same name, an unknown name, an old or a future
signature, and signature headers moved to another request."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from kmnode.identity import (
    MAX_AGE_S,
    AuthError,
    IdentityError,
    IdentityKeys,
    PublicIdentity,
    find_key,
    sign_request,
    verify_request,
)

BODY = b'{"name": "db"}'


@pytest.fixture
def alice() -> IdentityKeys:
    return IdentityKeys.generate("alice")


def lookup_of(*identities: PublicIdentity):  # type: ignore[no-untyped-def]
    table = {i.name: i for i in identities}
    return table.get


def code_of(method: str, target: str, headers: dict[str, str], body: bytes, lookup) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthError) as caught:
        verify_request(method, target, headers, body, lookup)
    return caught.value.code


def test_a_signed_request_verifies_and_names_its_signer(alice: IdentityKeys) -> None:
    public = alice.public(["operator"])
    headers = sign_request(alice, "POST", "/v1/keys?x=1", BODY)
    verified = verify_request("POST", "/v1/keys?x=1", headers, BODY, lookup_of(public))
    assert verified.identity == public
    assert verified.request_id == f"alice:{verified.nonce}"
    assert abs(verified.created - time.time()) < 5


def test_two_signatures_of_the_same_request_have_different_ids(alice: IdentityKeys) -> None:
    lookup = lookup_of(alice.public(["operator"]))
    signed = [sign_request(alice, "POST", "/v1/keys", BODY) for _ in range(3)]
    ids = {verify_request("POST", "/v1/keys", h, BODY, lookup).request_id for h in signed}
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", "/v1/keys", b'{"name": "other"}'),  # the body changed
        ("POST", "/v1/keys/db/rotate", BODY),  # the path changed
        ("POST", "/v1/keys?linearizable=1", BODY),  # the query changed
        ("GET", "/v1/keys", BODY),  # the method changed
    ],
)
def test_a_changed_request_is_refused(
    alice: IdentityKeys, method: str, target: str, body: bytes
) -> None:
    headers = sign_request(alice, "POST", "/v1/keys", BODY)
    assert code_of(method, target, headers, body, lookup_of(alice.public(["admin"]))) == (
        "bad_signature"
    )


def test_unsigned_unknown_and_impostor_requests_are_refused(alice: IdentityKeys) -> None:
    public = alice.public(["admin"])
    assert code_of("POST", "/v1/keys", {}, BODY, lookup_of(public)) == "unsigned"
    headers = sign_request(alice, "POST", "/v1/keys", BODY)
    assert code_of("POST", "/v1/keys", headers, BODY, lookup_of()) == "unknown_identity"
    impostor = IdentityKeys.generate("alice")  # same name, another key
    forged = sign_request(impostor, "POST", "/v1/keys", BODY)
    assert code_of("POST", "/v1/keys", forged, BODY, lookup_of(public)) == "bad_signature"


def test_old_and_future_signatures_are_refused(alice: IdentityKeys) -> None:
    lookup = lookup_of(alice.public(["admin"]))
    old = sign_request(alice, "POST", "/v1/keys", BODY, created=time.time() - MAX_AGE_S - 60)
    assert code_of("POST", "/v1/keys", old, BODY, lookup) == "expired"
    future = sign_request(alice, "POST", "/v1/keys", BODY, created=time.time() + 600)
    assert code_of("POST", "/v1/keys", future, BODY, lookup) == "expired"


@pytest.mark.parametrize(
    "headers",
    [
        {"signature": "garbage", "signature-input": "garbage"},
        {"signature": "kmsim=:AAAA:", "signature-input": 'kmsim=("@method");keyid="alice"'},
        {"signature": "x" * 4000, "signature-input": "(" * 2000},
    ],
)
def test_garbage_signature_headers_are_refused_not_raised(
    alice: IdentityKeys, headers: dict[str, str]
) -> None:
    assert code_of("POST", "/v1/keys", headers, BODY, lookup_of(alice.public(["admin"]))) in (
        "bad_signature",
        "expired",
    )


def test_a_signature_needs_a_nonce_of_its_own(alice: IdentityKeys) -> None:
    headers = sign_request(alice, "POST", "/v1/keys", BODY, nonce="short")
    assert code_of("POST", "/v1/keys", headers, BODY, lookup_of(alice.public(["admin"]))) == (
        "bad_signature"
    )


def test_roles_grant_what_they_include() -> None:
    keys = IdentityKeys.generate("bob")
    admin, operator, auditor = (keys.public([r]) for r in ("admin", "operator", "auditor"))
    assert admin.may("admin") and admin.may("auditor") and not admin.may("operator")
    assert operator.may("operator") and operator.may("auditor") and not operator.may("admin")
    assert auditor.may("auditor") and not auditor.may("operator")
    assert not keys.public(["user"]).may("auditor")


def test_key_files_are_private_and_never_overwritten(tmp_path: Path, alice: IdentityKeys) -> None:
    path = tmp_path / "keys" / "alice.key"
    alice.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert IdentityKeys.load(path) == alice
    with pytest.raises(IdentityError, match="not overwriting"):
        IdentityKeys.generate("alice").save(path)
    assert IdentityKeys.load(path) == alice
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        IdentityKeys.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{}",
        '{"name": "alice"}',
        '{"name": "A!", "signing_seed": "00", "box_secret": "00"}',
        '{"name": "alice", "signing_seed": "00", "box_secret": "00"}',
        "[1]",
    ],
)
def test_a_broken_key_file_is_refused_with_its_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=r"broken\.key"):
        IdentityKeys.load(path)


def test_no_secret_in_repr(alice: IdentityKeys) -> None:
    text = repr(alice) + str(alice)
    assert alice.signing_seed.hex() not in text and alice.box_secret.hex() not in text


def test_a_name_is_found_in_the_key_dir_or_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alice: IdentityKeys
) -> None:
    monkeypatch.setenv("KMSIM_IDENTITY_DIR", str(tmp_path / "keys"))
    alice.save(tmp_path / "keys" / "alice.key")
    IdentityKeys.generate("carol").save(tmp_path / "state" / "identities" / "carol.key")
    assert find_key("alice", tmp_path / "state") == tmp_path / "keys" / "alice.key"
    assert find_key("carol", tmp_path / "state").name == "carol.key"
    assert (
        find_key(str(tmp_path / "keys" / "alice.key"), tmp_path) == tmp_path / "keys" / "alice.key"
    )
    with pytest.raises(IdentityError, match="keygen"):
        find_key("dave", tmp_path / "state")
