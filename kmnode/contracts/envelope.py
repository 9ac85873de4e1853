"""How a contract call's arguments and its result travel: the one definition both ends use.

A caller (``kmctl``, the chaos workload) seals the arguments to the cluster's contract-input
key (an X25519 sealed box) together with its own name, the call's nonce and a fresh reply key;
only a service enclave opens them (``open_call``), and only under the very call whose caller
and nonce they name, so sealed arguments cut from one call and pasted into another are
refused, identically on every node. The result comes back encrypted under the reply key (one
AEAD, first byte 1), or, when the arguments did not open and no reply key is known, boxed to
the caller's identity key (first byte 2). Nothing here is kept: the reply key lives in the
caller's memory for the one call.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox

from kmnode.contracts.vm import CallResult

#: The first byte of a sealed result: how to open it.
SEALED_REPLY_KEY, SEALED_BOX = b"\x01", b"\x02"
REPLY_KEY_BYTES = SecretBox.KEY_SIZE


class EnvelopeError(ValueError):
    """Something that does not open as it must (the message names no plaintext)."""


@dataclass(frozen=True)
class OpenedCall:
    args: bytes
    #: The key the result goes back under (None: the caller sent none; box the result).
    reply_key: bytes | None

    def __repr__(self) -> str:  # the caller's arguments and key are not for logs
        return f"OpenedCall({len(self.args)} bytes, reply_key={self.reply_key is not None})"


def seal_call(
    input_key: bytes, caller: str, nonce: str, args: bytes, reply_key: bytes | None = None
) -> str:
    """The arguments as the cluster takes them (base64), for ``caller``'s call ``nonce``."""
    inner: dict[str, str] = {
        "args": base64.b64encode(args).decode(),
        "caller": caller,
        "nonce": nonce,
    }
    if reply_key is not None:
        if len(reply_key) != REPLY_KEY_BYTES:
            raise EnvelopeError(f"a reply key is {REPLY_KEY_BYTES} bytes")
        inner["reply"] = reply_key.hex()
    sealed = SealedBox(PublicKey(input_key)).encrypt(json.dumps(inner).encode())
    return base64.b64encode(bytes(sealed)).decode()


def open_call(input_key: PrivateKey, sealed_b64: str, caller: str, nonce: str) -> OpenedCall:
    """The service enclave's side: the arguments, if sealed to ``input_key`` for this caller
    and this nonce; ``EnvelopeError`` otherwise."""
    try:
        opened = json.loads(SealedBox(input_key).decrypt(base64.b64decode(sealed_b64)))
        if opened.get("caller") != caller or opened.get("nonce") != nonce:
            raise EnvelopeError("sealed for another call")
        args = base64.b64decode(opened["args"], validate=True)
        reply = opened.get("reply")
        reply_key = None if reply is None else bytes.fromhex(reply)
    except (CryptoError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EnvelopeError(f"the arguments do not open: {type(exc).__name__}") from None
    if reply_key is not None and len(reply_key) != REPLY_KEY_BYTES:
        raise EnvelopeError(f"a reply key is {REPLY_KEY_BYTES} bytes")
    return OpenedCall(args, reply_key)


def report_of(result: CallResult) -> dict[str, Any]:
    """What a result envelope says of a call that ran (the service enclave seals it; a
    reference executor computes the same to compare)."""
    return {
        "status": result.status,
        "code": result.code,
        "fuel_used": result.fuel_used,
        "result": base64.b64encode(result.result).decode(),
        "events": [base64.b64encode(e).decode() for e in result.events],
        "error": result.error,
    }


def seal_result(reply_key: bytes | None, box_key_hex: str, data: bytes) -> bytes:
    """The result for the caller alone (empty if there is no key to seal it to: then it is
    not released at all)."""
    if reply_key is not None:
        return SEALED_REPLY_KEY + bytes(SecretBox(reply_key).encrypt(data))
    try:
        return SEALED_BOX + bytes(SealedBox(PublicKey(bytes.fromhex(box_key_hex))).encrypt(data))
    except (ValueError, TypeError):
        return b""


def open_result(box_secret: bytes, sealed_b64: str, reply_key: bytes | None) -> dict[str, Any]:
    """A result, opened with the call's reply key or the caller's own key: the JSON object the
    service enclave reported; ``EnvelopeError`` if it does not open or is not one."""
    try:
        sealed = base64.b64decode(sealed_b64, validate=True)
        kind, body = sealed[:1], sealed[1:]
        if kind == SEALED_REPLY_KEY and reply_key is not None:
            opened = SecretBox(reply_key).decrypt(body)
        elif kind == SEALED_BOX:
            opened = SealedBox(PrivateKey(box_secret)).decrypt(body)
        else:
            raise EnvelopeError("sealed in a way this call cannot open")
        report = json.loads(opened)
    except (CryptoError, ValueError, TypeError) as exc:
        raise EnvelopeError(f"the result does not open: {type(exc).__name__}") from None
    if not isinstance(report, dict):
        raise EnvelopeError("the opened result is not a JSON object")
    return report


__all__ = [
    "REPLY_KEY_BYTES",
    "SEALED_BOX",
    "SEALED_REPLY_KEY",
    "EnvelopeError",
    "OpenedCall",
    "open_call",
    "open_result",
    "report_of",
    "seal_call",
    "seal_result",
]
