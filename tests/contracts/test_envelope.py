"""The call envelope both ends use: arguments open only under the call they were sealed for,
and a result opens only for its caller."""

from __future__ import annotations

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from kmnode.contracts.envelope import (
    EnvelopeError,
    open_call,
    open_result,
    seal_call,
    seal_result,
)

INPUT, ALICE, EVE = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
NONCE = "ab" * 16


def test_arguments_open_only_for_the_call_they_were_sealed_for() -> None:
    reply = secrets.token_bytes(32)
    sealed = seal_call(bytes(INPUT.public_key), "alice", NONCE, b"\x05bob", reply)
    opened = open_call(INPUT, sealed, "alice", NONCE)
    assert (opened.args, opened.reply_key) == (b"\x05bob", reply)
    assert b"bob" not in repr(opened).encode()
    for caller, nonce in (("eve", NONCE), ("alice", "cd" * 16)):
        with pytest.raises(EnvelopeError, match="do not open"):
            open_call(INPUT, sealed, caller, nonce)
    with pytest.raises(EnvelopeError):
        open_call(EVE, sealed, "alice", NONCE)  # not the contract-input key


def test_a_reply_key_must_be_a_key() -> None:
    with pytest.raises(EnvelopeError, match="32 bytes"):
        seal_call(bytes(INPUT.public_key), "alice", NONCE, b"", b"short")


def test_a_result_opens_for_its_caller_only() -> None:
    reply = secrets.token_bytes(32)
    under_reply = base64.b64encode(seal_result(reply, "", b'{"ok": 1}')).decode()
    boxed = base64.b64encode(
        seal_result(None, bytes(ALICE.public_key).hex(), b'{"ok": 2}')
    ).decode()
    assert open_result(bytes(EVE), under_reply, reply) == {"ok": 1}
    assert open_result(bytes(ALICE), boxed, None) == {"ok": 2}
    for secret, sealed, key in (
        (bytes(ALICE), under_reply, None),
        (bytes(ALICE), under_reply, secrets.token_bytes(32)),
        (bytes(EVE), boxed, None),
    ):
        with pytest.raises(EnvelopeError):
            open_result(secret, sealed, key)
    assert seal_result(None, "not hex", b"x") == b""  # nobody to seal to: nothing released


@given(st.binary(max_size=200), st.text(max_size=20))
def test_garbage_never_opens_and_never_raises_anything_else(data: bytes, caller: str) -> None:
    text = base64.b64encode(data).decode()
    with pytest.raises(EnvelopeError):
        open_call(INPUT, text, caller, NONCE)
    with pytest.raises(EnvelopeError):
        open_result(bytes(ALICE), text, secrets.token_bytes(32))
