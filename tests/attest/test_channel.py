"""The attested channel refuses tampered, replayed, reordered and reflected frames."""

from __future__ import annotations

import pytest

from attest import errors
from attest.channel import SecureChannel

K1, K2 = b"\x01" * 32, b"\x02" * 32


def pair() -> tuple[SecureChannel, SecureChannel]:
    return SecureChannel(K1, K2, "b"), SecureChannel(K2, K1, "a")


def test_frames_round_trip_in_both_directions() -> None:
    a, b = pair()
    for i in range(5):
        assert b.open(a.seal(f"a{i}".encode())) == f"a{i}".encode()
        assert a.open(b.seal(f"b{i}".encode())) == f"b{i}".encode()


def test_tampered_frame_is_rejected_and_channel_still_works() -> None:
    a, b = pair()
    genuine = a.seal(b"secret payload")
    frame = bytearray(genuine)
    frame[12] ^= 0x01
    with pytest.raises(errors.FrameTampered):
        b.open(bytes(frame))
    assert b.open(genuine) == b"secret payload"


def test_frame_with_altered_counter_is_rejected() -> None:
    a, b = pair()
    frame = bytearray(a.seal(b"x"))
    frame[7] ^= 0x01
    with pytest.raises(errors.FrameTampered):
        b.open(bytes(frame))


def test_truncated_frame_is_rejected() -> None:
    a, b = pair()
    with pytest.raises(errors.FrameTampered):
        b.open(a.seal(b"x")[:10])


def test_replayed_frame_is_rejected() -> None:
    a, b = pair()
    first = a.seal(b"one")
    assert b.open(first) == b"one"
    with pytest.raises(errors.FrameReplayed):
        b.open(first)


def test_reordered_frames_are_rejected() -> None:
    a, b = pair()
    first, second = a.seal(b"one"), a.seal(b"two")
    with pytest.raises(errors.FrameReordered):
        b.open(second)
    assert b.open(first) == b"one"
    assert b.open(second) == b"two"


def test_reflected_frame_is_rejected() -> None:
    a, _ = pair()
    frame = a.seal(b"to b")
    with pytest.raises(errors.FrameReflected):
        a.open(frame)


def test_channel_needs_distinct_directional_keys() -> None:
    with pytest.raises(ValueError):
        SecureChannel(K1, K1, "x")


def test_repr_hides_keys() -> None:
    a, _ = pair()
    assert K1.hex() not in repr(a) and "\\x01" not in repr(a)
