"""Codec: every Message round-trips; damaged or hostile bytes raise CodecError and nothing else."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.codec import (
    VERSION,
    CodecError,
    MessageTooLarge,
    decode_message,
    encode_message,
)
from consensus.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

u63 = st.integers(0, (1 << 63) - 1)
small = st.integers(0, 1000)
ints = st.one_of(small, u63)
node = st.text(max_size=12)
entry = st.builds(Entry, ints, ints, st.sampled_from(EntryType), st.binary(max_size=40))
conf = st.builds(
    ConfState,
    st.lists(node, max_size=4).map(tuple),
    st.lists(node, max_size=3).map(tuple),
)
snapshot = st.builds(Snapshot, st.builds(SnapshotMeta, ints, ints, conf), st.binary(max_size=64))
message = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=node,
    frm=node,
    term=ints,
    log_term=ints,
    index=ints,
    entries=st.lists(entry, max_size=6).map(tuple),
    commit=ints,
    reject=st.booleans(),
    reject_hint=ints,
    snapshot=st.none() | snapshot,
    context=st.binary(max_size=16),
)


@settings(max_examples=300)
@given(message)
def test_round_trip(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=300)
@given(message, st.data())
def test_truncation_always_raises_codec_error(msg: Message, data: st.DataObject) -> None:
    raw = encode_message(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CodecError):
        decode_message(raw[:cut])


@settings(max_examples=500)
@given(message, st.data())
def test_flipped_bytes_decode_or_raise_codec_error(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        got = decode_message(bytes(raw))
    except CodecError:
        return
    # A flip inside a value can yield another valid message: it must then be a well-formed one.
    assert isinstance(got, Message)
    assert decode_message(encode_message(got)) == got


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(raw: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_message(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.__setitem__(0, 99),  # unknown version
        lambda f: f.__setitem__(1, 0),  # unknown message type
        lambda f: f.__setitem__(1, True),  # bool is not an int
        lambda f: f.__setitem__(2, b"bytes"),  # node id must be str
        lambda f: f.__setitem__(2, "x" * 300),  # node id too long
        lambda f: f.__setitem__(4, -1),  # negative term
        lambda f: f.__setitem__(4, 1 << 63),  # term out of range
        lambda f: f.__setitem__(4, 1.5),  # float
        lambda f: f.__setitem__(7, [[1, 1, 9, b""]]),  # unknown entry type
        lambda f: f.__setitem__(7, [[1, 1, 0]]),  # short entry
        lambda f: f.__setitem__(7, [[1, 1, 0, "str"]]),  # entry data must be bytes
        lambda f: f.__setitem__(7, {}),  # entries must be an array
        lambda f: f.__setitem__(9, 1),  # reject must be bool
        lambda f: f.__setitem__(11, [1, 1, [], []]),  # short snapshot
        lambda f: f.__setitem__(11, [1, 1, [7], [], b""]),  # voter ids must be str
        lambda f: f.__setitem__(12, b"x" * 70_000),  # context too long
        lambda f: f.append(0),  # extra field
        lambda f: f.pop(),  # missing field
    ],
)
def test_invalid_fields_rejected(mutate: object) -> None:
    msg = Message(MessageType.APPEND, "b", "a", 3, 2, 9, (Entry(3, 10, data=b"d"),), 8)
    fields = msgpack.unpackb(encode_message(msg), raw=False)
    assert fields[0] == VERSION
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(CodecError):
        decode_message(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        msgpack.packb({"type": 5}),
        msgpack.packb(msgpack.ExtType(5, b"boom")),
        msgpack.packb([msgpack.ExtType(1, b"x")] * 13),
        b"\xc1",  # reserved byte
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion elements
        msgpack.packb([1, 2, 3]) + b"trailing",
    ],
)
def test_hostile_inputs_rejected(raw: bytes) -> None:
    with pytest.raises(CodecError):
        decode_message(raw)


def test_size_limit_checked_before_parsing() -> None:
    big = Message(MessageType.APPEND, "b", "a", entries=(Entry(1, 1, data=b"x" * 5000),))
    raw = encode_message(big)
    assert decode_message(raw, max_bytes=len(raw)) == big
    with pytest.raises(MessageTooLarge):
        decode_message(raw, max_bytes=len(raw) - 1)
