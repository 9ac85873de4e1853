"""Provisioning boxes: only the addressed enclave opens them, and damage is refused."""

from __future__ import annotations

import pytest

from attest.keybox import CACHE_SIZE, KeyBoxError, KeyBoxes


def test_only_the_recipient_opens_a_box() -> None:
    km, service, other = KeyBoxes(), KeyBoxes(), KeyBoxes()
    message = km.seal(service.public, b"key material")
    assert service.open(message) == b"key material"
    assert b"key material" not in message
    with pytest.raises(KeyBoxError):
        other.open(message)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m[:-1] + bytes([m[-1] ^ 1]),  # ciphertext altered
        lambda m: bytes([m[0] ^ 1]) + m[1:],  # sender key swapped
        lambda m: m[:40],  # truncated
        lambda m: m[:32],  # nothing but a key
    ],
)
def test_altered_or_truncated_boxes_are_refused(damage: object) -> None:
    km, service = KeyBoxes(), KeyBoxes()
    message = km.seal(service.public, b"key material")
    with pytest.raises(KeyBoxError):
        service.open(damage(message))  # type: ignore[operator]


def test_many_senders_keep_working_past_the_cache() -> None:
    service = KeyBoxes()
    senders = [KeyBoxes() for _ in range(CACHE_SIZE + 3)]
    messages = [s.seal(service.public, b"k%d" % i) for i, s in enumerate(senders)]
    for _ in range(2):  # the second pass reopens boxes whose precomputation was evicted
        assert [service.open(m) for m in messages] == [b"k%d" % i for i in range(len(senders))]


def test_repr_shows_no_private_key() -> None:
    boxes = KeyBoxes()
    private = bytes(boxes._private)
    assert private.hex() not in repr(boxes) and repr(private) not in repr(boxes)
