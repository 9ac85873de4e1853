"""Contract state on the host: what it sees, and each way it can tamper, named."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.contracts.sealed_state import StateSealer, TamperError

KEY = bytes(range(32))


def sealer(contract: str = "token", generation: int = 1, key: bytes = KEY) -> StateSealer:
    return StateSealer(contract, key, generation)


def test_a_value_round_trips_and_every_node_seals_it_to_the_same_bytes() -> None:
    record = sealer().seal(b"b:bob", b"\x46" + b"\0" * 7, 3)
    assert record == sealer().seal(b"b:bob", b"\x46" + b"\0" * 7, 3)  # deterministic
    opened = sealer().open(b"b:bob", record, seen_version=3)
    assert (opened.value, opened.version) == (b"\x46" + b"\0" * 7, 3)


def test_the_host_sees_neither_keys_nor_values() -> None:
    record = sealer().seal(b"b:bob", b"secret balance", 1)
    assert b"bob" not in record and b"secret balance" not in record
    assert sealer().hide(b"b:bob") != sealer("other").hide(b"b:bob")  # per contract
    assert sealer().hide(b"b:bob") != sealer(key=bytes(32)).hide(b"b:bob")  # keyed
    assert "bob" not in repr(sealer()) and KEY.hex() not in repr(sealer())


def test_a_record_of_another_key_or_contract_is_named_swapped() -> None:
    alice = sealer().seal(b"b:alice", b"1000", 1)
    with pytest.raises(TamperError) as caught:
        sealer().open(b"b:bob", alice)
    assert caught.value.kind == "swapped"
    theirs = sealer("other").seal(b"b:bob", b"1000", 1)
    with pytest.raises(TamperError, match="swapped"):
        sealer().open(b"b:bob", theirs)


def test_an_older_copy_is_named_stale() -> None:
    old = sealer().seal(b"b:bob", b"100", 1)
    sealer().open(b"b:bob", sealer().seal(b"b:bob", b"70", 2), seen_version=1)
    with pytest.raises(TamperError) as caught:
        sealer().open(b"b:bob", old, seen_version=2)
    assert caught.value.kind == "stale" and "older than version 2" in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(position: int, bit: int) -> None:
    record = bytearray(sealer().seal(b"b:bob", b"70 tokens", 5))
    position %= len(record)
    record[position] ^= 1 << bit
    with pytest.raises(TamperError) as caught:
        sealer().open(b"b:bob", bytes(record), seen_version=1)
    assert caught.value.kind in ("flipped", "swapped", "stale")


def test_truncated_records_another_generation_and_missing_ones_are_named() -> None:
    record = sealer().seal(b"b:bob", b"70", 2)
    with pytest.raises(TamperError, match="flipped: a record of 10 bytes is too short"):
        sealer().open(b"b:bob", record[:10])
    with pytest.raises(TamperError, match="flipped"):
        sealer(generation=2).open(b"b:bob", record)  # sealed under generation 1
    missing = sealer().missing(b"b:bob", 2)
    assert missing.kind == "missing" and "bob" not in str(missing)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        StateSealer("token", b"short", 1)
    with pytest.raises(ValueError, match="generation"):
        StateSealer("token", KEY, 0)
    with pytest.raises(ValueError, match="version"):
        sealer().seal(b"k", b"v", 0)
