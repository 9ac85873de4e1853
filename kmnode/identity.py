"""Operator identities: key files, public identities with roles, and signed API requests.

An identity is a name with two key pairs: Ed25519 to sign requests, X25519 for what is sealed to
that identity (recovery shares, contract and data results). The private halves live in a key
file (mode 0600) on the operator's machine; the public halves and the roles are replicated
state (genesis identities come from cluster.yaml; later changes are governance).

Requests are signed with HTTP Message Signatures (RFC 9421) through a maintained library
(``http_message_signatures``), algorithm ``ed25519``, covering the method, the path with its
query, the body's ``Content-Digest``, the creation time and a nonce; ``keyid`` names the
identity. The signer is the client (`kmctl`); the verifier is the KM enclave, which looks the
key up in its own replicated state: the host relays the headers and the body and can neither
mint a request nor change one. Replay is the verifier's to stop: ``(keyid, nonce)`` is the
request id, and a mutating request's id commits once (``kmnode.km.state``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import http_message_signatures as hms
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.public import PrivateKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from consensus.fileio import write_new

#: ``owner``: a data owner (registers datasets, grants their use); ``user``: calls contracts
#: and computes on data it was granted (S4, S5); ``recovery``: holds a share of the master
#: secret, boxed to its X25519 key, and submits it when the cluster recovers.
Role = Literal["admin", "operator", "auditor", "user", "owner", "recovery"]
ROLES: tuple[Role, ...] = ("admin", "operator", "auditor", "user", "owner", "recovery")
IdentityName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9._-]{0,31}$")]
HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

#: What a role may do besides its own name: an admin and an operator may also read.
_GRANTS: dict[Role, frozenset[Role]] = {
    "admin": frozenset({"admin", "auditor"}),
    "operator": frozenset({"operator", "auditor"}),
    "auditor": frozenset({"auditor"}),
    "user": frozenset({"user"}),
    "owner": frozenset({"owner"}),
    "recovery": frozenset({"recovery"}),
}
#: The covered components of every signature (RFC 9421 names).
COVERED = ("@method", "@path", "@query", "content-digest")
#: How old a request may be, and how far in the future (clock skew), when it is verified.
MAX_AGE_S = 60
MAX_SKEW_S = 30
#: Label and application tag of our signatures (the tag is signed; the label is not).
LABEL = "kmsim"
TAG = "kmsim-api"
KEY_FILE_MODE = 0o600


class IdentityError(Exception):
    """A key file or identity is unusable; the message says which and why."""


class PublicIdentity(BaseModel):
    """The public half of an identity and its roles, as cluster.yaml and the ledger hold it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: IdentityName
    roles: Annotated[list[Role], Field(min_length=1, max_length=len(ROLES))]
    #: Ed25519 verification key (hex): checks this identity's request signatures.
    signing_key: HexKey
    #: X25519 public key (hex): what is sealed to this identity is boxed to it.
    box_key: HexKey

    def may(self, role: Role) -> bool:
        """Whether this identity holds ``role`` or a role that includes it."""
        return any(role in _GRANTS[held] for held in self.roles)


@dataclass(frozen=True)
class IdentityKeys:
    """An identity's private keys. ``repr`` shows the name only: a key never reaches a log."""

    name: str
    signing_seed: bytes
    box_secret: bytes

    def __repr__(self) -> str:
        return f"IdentityKeys(name={self.name!r})"

    @classmethod
    def generate(cls, name: str) -> IdentityKeys:
        _check_name(name)
        return cls(name, secrets.token_bytes(32), bytes(PrivateKey.generate()))

    def public(self, roles: list[Role]) -> PublicIdentity:
        signing = Ed25519PrivateKey.from_private_bytes(self.signing_seed).public_key()
        return PublicIdentity(
            name=self.name,
            roles=roles,
            signing_key=signing.public_bytes_raw().hex(),
            box_key=bytes(PrivateKey(self.box_secret).public_key).hex(),
        )

    def save(self, path: Path) -> None:
        """Write the key file with mode 0600, created exclusively: an existing file is never
        overwritten (it may be the only copy of someone's keys)."""
        data = {
            "name": self.name,
            "signing_seed": self.signing_seed.hex(),
            "box_secret": self.box_secret.hex(),
        }
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            write_new(path, (json.dumps(data) + "\n").encode(), mode=KEY_FILE_MODE)
        except FileExistsError:
            raise IdentityError(f"{path} exists: not overwriting a key file") from None

    @classmethod
    def load(cls, path: Path) -> IdentityKeys:
        try:
            mode = path.stat().st_mode & 0o777
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IdentityError(f"no key file at {path}") from None
        except (OSError, ValueError) as exc:
            raise IdentityError(f"{path} is not a readable key file ({exc})") from None
        if mode & 0o077:
            raise IdentityError(
                f"{path} is readable by others (mode {mode:o}): chmod 600 it, it holds private keys"
            )
        try:
            name, seed, box = raw["name"], raw["signing_seed"], raw["box_secret"]
            keys = cls(_check_name(name), bytes.fromhex(seed), bytes.fromhex(box))
        except (KeyError, TypeError, ValueError, IdentityError) as exc:
            raise IdentityError(f"{path} is not a kmsim key file ({exc})") from None
        if len(keys.signing_seed) != 32 or len(keys.box_secret) != 32:
            raise IdentityError(f"{path} is not a kmsim key file (keys must be 32 bytes)")
        return keys


#: The identity `kmctl up` makes for a cluster without identities (the development profile).
DEV_IDENTITY = "dev-admin"
#: It also holds the one recovery share of the development profile (threshold 1).
DEV_ROLES: list[Role] = ["admin", "operator", "auditor", "user", "owner", "recovery"]


def default_key_dir() -> Path:
    """Where `kmctl identity keygen` writes, and where a name is looked up:
    ``$KMSIM_IDENTITY_DIR``, else ``~/.kmsim/identities``."""
    configured = os.environ.get("KMSIM_IDENTITY_DIR")
    return Path(configured) if configured else Path.home() / ".kmsim" / "identities"


def dev_key_path(state_dir: Path) -> Path:
    return state_dir / "identities" / f"{DEV_IDENTITY}.key"


def find_key(name_or_path: str, state_dir: Path) -> Path:
    """The key file ``name_or_path`` means: a path to a file, else ``NAME.key`` in the key
    directory or in the cluster's state directory."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    candidates = [
        default_key_dir() / f"{name_or_path}.key",
        state_dir / "identities" / f"{name_or_path}.key",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p) for p in [given, *candidates])
    raise IdentityError(
        f"no key file for identity {name_or_path!r} (looked at {looked}); "
        "make one with `kmctl identity keygen NAME`"
    )


def ensure_dev_identity(state_dir: Path) -> PublicIdentity:
    """The development profile's admin: its key file in the state directory (made on first
    use, mode 0600), and its public identity."""
    path = dev_key_path(state_dir)
    if not path.exists():
        IdentityKeys.generate(DEV_IDENTITY).save(path)
    return IdentityKeys.load(path).public(DEV_ROLES)


def _check_name(name: Any) -> str:
    try:
        PublicIdentity.model_validate(
            {"name": name, "roles": ["user"], "signing_key": "0" * 64, "box_key": "0" * 64}
        )
    except ValidationError:
        raise IdentityError(
            f"{name!r} is not an identity name (lowercase letters, digits, '.', '_', '-'; "
            "a letter first; at most 32)"
        ) from None
    assert isinstance(name, str)
    return name


# --- signing (the client) ------------------------------------------------------------------


@dataclass
class _Message:
    """What the library signs and verifies: a request's method, URL and headers."""

    method: str
    url: str
    headers: dict[str, str]


class _Keys(hms.HTTPSignatureKeyResolver):
    def __init__(
        self,
        private: Ed25519PrivateKey | None = None,
        lookup: Callable[[str], Ed25519PublicKey | None] | None = None,
    ) -> None:
        self._private = private
        self._lookup = lookup

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        assert self._private is not None
        return self._private

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self._lookup(key_id) if self._lookup is not None else None


def sign_request(
    keys: IdentityKeys,
    method: str,
    target: str,
    body: bytes,
    *,
    created: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers that sign ``method target`` with ``body`` as ``keys``' identity:
    ``Signature-Input``, ``Signature`` and ``Content-Digest``. ``target`` is the path with its
    query (``/v1/keys?linearizable=1``)."""
    signer = hms.HTTPMessageSigner(
        signature_algorithm=hms.algorithms.ED25519,
        key_resolver=_Keys(private=Ed25519PrivateKey.from_private_bytes(keys.signing_seed)),
    )
    message = _Message(method.upper(), _url(target), {})
    when = datetime.datetime.fromtimestamp(
        created if created is not None else datetime.datetime.now().timestamp(),
        tz=datetime.UTC,
    )
    signer.sign(
        message,
        key_id=keys.name,
        created=when,
        nonce=nonce if nonce is not None else secrets.token_hex(16),
        label=LABEL,
        tag=TAG,
        covered_component_ids=COVERED,
        body=body,
    )
    return dict(message.headers)


def _url(target: str) -> str:
    # The authority is not covered (a request may be sent on to the leader), so any will do.
    return "http://kmsim" + target


# --- verification (the KM enclave) ---------------------------------------------------------


#: Why a request's signature is not accepted (the operator API maps each to 401).
AuthCode = Literal["unsigned", "bad_signature", "unknown_identity", "expired"]


class AuthError(Exception):
    def __init__(self, code: AuthCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Verified:
    """A request whose signature verified: who signed it, its id, when it was made."""

    identity: PublicIdentity
    nonce: str
    created: int

    @property
    def request_id(self) -> str:
        return f"{self.identity.name}:{self.nonce}"


#: The request headers a signature needs, lower-case: all the host relays of a request's headers.
SIGNATURE_HEADERS = ("signature-input", "signature", "content-digest")


#: How the library words a signature that is too old or from the future.
_TIME_ERRORS = ('Signature "created" parameter is set to a time in the future', "Signature age")


class _Verifier(hms.HTTPMessageVerifier):
    max_clock_skew = datetime.timedelta(seconds=MAX_SKEW_S)


#: The one form ``sign_request`` writes, character for character (RFC 9421 serialises these
#: fields one way): what the fast path reads without a structured-field parser.
_FAST_INPUT = re.compile(
    r'kmsim=(\("@method" "@path" "@query" "content-digest"\);created=([1-9][0-9]{0,11});'
    r'keyid="([a-z][a-z0-9._-]{0,31})";alg="ed25519";nonce="([0-9a-f]{16,64})";'
    r'tag="kmsim-api")'
)
_FAST_SIGNATURE = re.compile(r"kmsim=:([A-Za-z0-9+/]{86}==):")
_FAST_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]{43}=):")
#: A path and a query that every RFC 9421 component resolver takes as they are (no percent
#: escapes, nothing to normalise).
_FAST_TARGET = re.compile(r"(/[A-Za-z0-9._~/-]*)(?:\?([A-Za-z0-9._~=&-]*))?")
#: Verification keys by hex (identities change rarely; their keys are parsed once).
_VERIFY_KEYS: dict[str, Ed25519PublicKey] = {}


def _fast_verify(
    method: str,
    target: str,
    present: Mapping[str, str],
    body: bytes,
    lookup: Callable[[str], PublicIdentity | None],
) -> Verified | None:
    """Accept a request signed exactly as ``sign_request`` signs, or None for anything else.

    Why: the library's structured-field parsing was two thirds of a verification's cost, and
    a verification was the largest part of the KM enclave's work per request. This path only
    ever accepts: it builds the same signature base the library builds for this one form (a
    test compares them), checks the body's digest, the age with a second's margin inside the
    library's bounds, and the signature with the same Ed25519 implementation. Whatever it
    does not accept goes to ``verify_request``'s full path, which accepts or says why not.
    """
    matched = _FAST_INPUT.fullmatch(present.get("signature-input", ""))
    signature = _FAST_SIGNATURE.fullmatch(present.get("signature", ""))
    digest = _FAST_DIGEST.fullmatch(present.get("content-digest", ""))
    route = _FAST_TARGET.fullmatch(target)
    if matched is None or signature is None or digest is None or route is None:
        return None
    params, created_text, key_id, nonce = matched.groups()
    created = int(created_text)
    now = time.time()
    if not now - MAX_AGE_S + 1 < created < now + MAX_SKEW_S - 1:
        return None
    if base64.b64decode(digest.group(1)) != hashlib.sha256(body).digest():
        return None
    identity = lookup(key_id)
    if identity is None:
        return None
    key = _VERIFY_KEYS.get(identity.signing_key)
    if key is None:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(identity.signing_key))
        if len(_VERIFY_KEYS) < 4096:
            _VERIFY_KEYS[identity.signing_key] = key
    path, query = route.groups()
    base = (
        f'"@method": {method.upper()}\n"@path": {path}\n"@query": ?{query or ""}\n'
        f'"content-digest": {present["content-digest"]}\n"@signature-params": {params}'
    )
    try:
        key.verify(base64.b64decode(signature.group(1)), base.encode())
    except InvalidSignature:
        return None
    return Verified(identity, nonce, created)


def verify_request(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    lookup: Callable[[str], PublicIdentity | None],
) -> Verified:
    """Check a request's signature against the identity its ``keyid`` names (``lookup`` reads
    the caller's own state) and its age; raise ``AuthError`` saying what is wrong."""
    present = {k.lower(): v for k, v in headers.items() if k.lower() in SIGNATURE_HEADERS}
    if "signature" not in present or "signature-input" not in present:
        raise AuthError("unsigned", "the request is not signed (Signature, Signature-Input)")
    fast = _fast_verify(method, target, present, body, lookup)
    if fast is not None:
        return fast
    found: dict[str, PublicIdentity] = {}
    missing: list[str] = []

    def public_key(key_id: str) -> Ed25519PublicKey | None:
        identity = lookup(key_id)
        if identity is None:
            missing.append(key_id)
            return None
        found[key_id] = identity
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(identity.signing_key))

    verifier = _Verifier(
        signature_algorithm=hms.algorithms.ED25519, key_resolver=_Keys(lookup=public_key)
    )
    message = _Message(method.upper(), _url(target), present)
    try:
        results = verifier.verify(
            message,
            max_age=datetime.timedelta(seconds=MAX_AGE_S),
            expect_tag=TAG,
            require_components=COVERED,
            body=body,
        )
    except hms.InvalidSignature as exc:
        text = str(exc)
        if missing:
            raise AuthError("unknown_identity", f"no identity named {missing[0][:64]!r}") from None
        if text.startswith(_TIME_ERRORS):
            raise AuthError(
                "expired", f"{text} (a request is valid {MAX_AGE_S} s after it is signed)"
            ) from None
        reason = text or (
            "the method, path, query or body differ from what was signed, or another key signed it"
        )
        raise AuthError("bad_signature", f"the signature does not verify: {reason}") from None
    except (hms.HTTPMessageSignaturesException, ValueError, TypeError) as exc:
        raise AuthError("bad_signature", f"the signature is malformed: {exc}") from None
    if len(results) != 1:
        raise AuthError("bad_signature", "exactly one kmsim signature is expected")
    params = results[0].parameters
    key_id, nonce, created = params.get("keyid"), params.get("nonce"), params.get("created")
    if not isinstance(key_id, str) or key_id not in found:
        raise AuthError("unknown_identity", f"no identity named {key_id!r}")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise AuthError("bad_signature", "the signature needs a nonce of 16..64 characters")
    if not isinstance(created, int):
        raise AuthError("bad_signature", "the signature needs a creation time")
    return Verified(found[key_id], nonce, created)


def fingerprint(identity: PublicIdentity) -> str:
    """A short, printable handle of an identity's signing key (for humans comparing keys)."""
    raw = bytes.fromhex(identity.signing_key)
    return base64.b32encode(raw[:10]).decode().lower()
