"""What a data owner's and a data user's own machine does around the API (issue 15, S5): the
registration of a sealed dataset, the body of a computation, and the opening of its result.

Used by every client of the data routes (``kmctl data``, the chaos workload), so the
registration, the sealing of parameters and the checks on a result are made one way only.
No I/O: the caller fetches the cluster's keys (``GET /v1/data/keys``) and sends the bodies.

What stays here: the data key is wrapped to the cluster's wrap key (only a KM enclave unwraps
it); the parameters are sealed to the cluster's input key under the user's name and a fresh
nonce (only a service enclave opens them, for this computation only), and their digest goes
in the clear for the token to bind; a result is opened only after its hash is checked against
the one committed with the token. Messages name tokens and identities, never a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from kmnode.contracts import envelope
from kmnode.dataauth.blob import SealedDataset
from kmnode.dataauth.ops import BUILTIN_OPS, canonical_json, params_digest, validate_params
from kmnode.dataauth.wasm_op import validate_wasm_params


class ResultError(ValueError):
    """A sealed result that must not be believed (the message names no value)."""


class ResultHashMismatch(ResultError):
    """The sealed result is not the one whose hash was committed with the token."""


class ResultUnopened(ResultError):
    """The sealed result does not open with this key, or is not a JSON object inside."""


def registration_body(
    name: str,
    sealed: SealedDataset,
    dek: bytes,
    wrap_key_hex: str,
    *,
    privacy: str,
    ops: Sequence[str],
    min_group_size: int,
) -> dict[str, Any]:
    """``POST /v1/datasets``: the digests and size of ``sealed`` and its data key ``dek``
    wrapped (sealed box) to the cluster's wrap key; the blob itself goes to the hosts."""
    wrapped = SealedBox(PublicKey(bytes.fromhex(wrap_key_hex))).encrypt(dek)
    return {
        "name": name,
        "digest_ct": sealed.digest_ct,
        "digest_pt": sealed.digest_pt,
        "size": sealed.size,
        "privacy": privacy,
        "ops": list(ops),
        "wrapped_key": base64.b64encode(bytes(wrapped)).decode(),
        "min_group_size": min_group_size,
    }


def checked_params(operation: str, params: Mapping[str, object]) -> dict[str, object]:
    """``params`` for ``operation`` in their one canonical form (every default filled in):
    a built-in's own, or a WebAssembly operation's (one column); ``OpRefused`` if they are
    not parameters of it. Send (and digest) only what this returns."""
    if operation in BUILTIN_OPS:
        return validate_params(operation, params)
    return validate_wasm_params(params)


def compute_body(
    input_key: bytes, user: str, operation: str, params: Mapping[str, object]
) -> dict[str, Any]:
    """``POST /v1/datasets/{name}/computations`` (without ``node`` and ``timeout``): the
    parameters checked for ``operation`` (``checked_params``; ``OpRefused`` if they are not
    its), sealed to the cluster's input key under ``user`` and a fresh nonce, and their
    digest. Checked here, whatever the caller did, so the digest always binds what is
    sealed, in its one canonical form."""
    checked = checked_params(operation, params)
    nonce = secrets.token_hex(16)
    return {
        "operation": operation,
        "params": params_digest(checked),
        "sealed": envelope.seal_call(input_key, user, nonce, canonical_json(checked)),
        "nonce": nonce,
    }


def open_result(sealed_b64: str, committed_hash: str, box_secret: bytes) -> dict[str, Any]:
    """A computation's result (``{"op", "version", "value"}``): ``sealed_b64`` checked against
    the hash committed with its token, then opened with the user's X25519 secret."""
    try:
        sealed = base64.b64decode(sealed_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ResultHashMismatch("the sealed result is not base64") from None
    if not sealed or hashlib.sha256(sealed).hexdigest() != committed_hash:
        raise ResultHashMismatch("the result does not match the hash committed with the token")
    try:
        result = json.loads(SealedBox(PrivateKey(box_secret)).decrypt(sealed))
    except (CryptoError, ValueError):
        raise ResultUnopened("the result does not open with this key") from None
    if not isinstance(result, dict):
        raise ResultUnopened("the result is not a JSON object")
    return result


__all__ = [
    "ResultError",
    "ResultHashMismatch",
    "ResultUnopened",
    "checked_params",
    "compute_body",
    "open_result",
    "registration_body",
]
