"""The backing the cache reads through: every lie of the host's store is named, and the state
root is the same on every node that wrote the same things."""

from __future__ import annotations

import pytest

from kmnode.contracts.sealed_state import StateSealer, TamperError
from kmnode.contracts.verified import MemoryHostStore, VerifiedBacking

KEY = bytes(range(32))


def backing() -> tuple[VerifiedBacking, MemoryHostStore]:
    store = MemoryHostStore()
    return VerifiedBacking(store, lambda contract: StateSealer(contract, KEY, 1)), store


def hidden(key: bytes, contract: str = "token") -> bytes:
    return StateSealer(contract, KEY, 1).hide(key)


def test_writes_read_back_and_deletes_are_absent() -> None:
    verified, store = backing()
    verified.store("token", {b"b:bob": b"70", b"b:cat": b"30"})
    verified.store("token", {b"b:cat": None})
    assert verified.load("token", b"b:bob") == b"70"
    assert verified.load("token", b"b:cat") is None
    assert verified.load("token", b"b:dan") is None
    assert len(store.records) == 1 and all(b"bob" not in r for r in store.records.values())


def tampered(how: str) -> TamperError:
    verified, store = backing()
    verified.store("token", {b"b:bob": b"100", b"b:cat": b"1"})
    old_bob = store.get("token", hidden(b"b:bob"))
    verified.store("token", {b"b:bob": b"70", b"b:gone": b"x"})
    old_gone = store.get("token", hidden(b"b:gone"))
    verified.store("token", {b"b:gone": None})
    bob, cat = hidden(b"b:bob"), hidden(b"b:cat")
    record = store.records[("token", bob)]
    if how == "flip":
        store.records[("token", bob)] = record[:-1] + bytes([record[-1] ^ 1])
    elif how == "swap":
        store.records[("token", bob)] = store.records[("token", cat)]
    elif how == "rollback":
        assert old_bob is not None
        store.records[("token", bob)] = old_bob
    elif how == "drop":
        del store.records[("token", bob)]
    elif how == "resurrect":
        assert old_gone is not None
        store.records[("token", hidden(b"b:gone"))] = old_gone
        with pytest.raises(TamperError) as caught:
            verified.load("token", b"b:gone")
        return caught.value
    elif how == "plant":
        store.records[("token", hidden(b"b:eve"))] = record
        with pytest.raises(TamperError) as caught:
            verified.load("token", b"b:eve")
        return caught.value
    with pytest.raises(TamperError) as caught:
        verified.load("token", b"b:bob")
    return caught.value


@pytest.mark.parametrize(
    ("how", "kind", "text"),
    [
        ("flip", "flipped", "does not authenticate"),
        ("swap", "swapped", "belongs to another key"),
        ("rollback", "stale", "older than version 2"),
        ("drop", "missing", "version 2 was written"),
        ("resurrect", "stale", "a key this enclave deleted"),
        ("plant", "swapped", "never wrote"),
    ],
)
def test_each_host_tamper_is_named(how: str, kind: str, text: str) -> None:
    error = tampered(how)
    assert error.kind == kind and text in str(error), error


def test_the_root_is_what_the_state_is_not_how_it_was_written() -> None:
    """Two nodes whose caches wrote back at different times (one batch against three) hold
    the same state, so the same root; any change of a value moves it."""
    batched, _ = backing()
    through, _ = backing()
    batched.store("token", {b"b:bob": b"70", b"b:cat": b"30"})
    through.store("token", {b"b:bob": b"100", b"b:cat": b"1", b"b:dan": b"5"})
    through.store("token", {b"b:bob": b"70", b"b:dan": None})
    through.store("token", {b"b:cat": b"30"})
    assert batched.root("token") == through.root("token")
    before = batched.root("token")
    batched.store("token", {b"b:bob": b"70"})  # the same value again: the same state
    assert batched.root("token") == before
    batched.store("token", {b"b:bob": b"71"})
    assert batched.root("token") != before
    assert batched.root("other") != batched.root("token")
    assert "bob" not in repr(batched)
