"""Raft ``Message`` <-> bytes, with msgpack and strict validation of everything received.

Input comes from the network, so decoding treats it as hostile: a size limit is checked before
parsing, msgpack's own length limits (``DecodeLimits``) bound each str, bin and array, a budget
on the array elements of one message stops allocation bombs (an 8 MiB message of nested empty
arrays otherwise becomes half a GiB of Python lists and seconds of a stalled event loop), only
arrays, ints, bools, str, bytes and nil are accepted (no maps, no ext types, nothing that builds
objects), and every field is type- and range-checked before a ``Message`` is built. Any
malformed input raises ``CodecError``; nothing else escapes ``decode_message``.

Wire form: one msgpack array ``[VERSION, type, to, frm, term, log_term, index, entries, commit,
reject, reject_hint, snapshot, context]`` where ``entries`` is an array of ``[term, index, type,
data]`` and ``snapshot`` is nil or ``[index, term, voters, learners, data]``. Positional arrays
keep the encoding small and the encoder fast (it is on the replication hot path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from consensus.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

VERSION = 1
#: Fields of the message array.
_FIELDS = 13
#: Default bound on one encoded message; snapshots larger than this need chunking.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_NODE_ID = 256
MAX_CONTEXT = 64 * 1024
MAX_MEMBERS = 1024
_U63 = 1 << 63

_MESSAGE_TYPES = {int(t): t for t in MessageType}
_ENTRY_TYPES = {int(t): t for t in EntryType}


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """How much one received message may make the decoder build.

    A message's size alone does not bound the work: one byte of msgpack is a whole empty list,
    so the number of array elements is bounded too (``max_items``, all arrays of the message
    together), checked as each array is built, so decoding stops at the first one past it.
    The defaults fit what Raft sends (``RaftConfig.max_msg_entries`` is 512 by default, so an
    append holds about 2,000 elements) with room to spare; ``kmnode.config.LimitsSpec`` sets
    them for a node's peer links.
    """

    #: Bytes of one encoded message (checked before parsing).
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bytes of one bin (an entry's data, a snapshot); never more than ``max_bytes``.
    max_bin: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bytes of one str (node ids).
    max_str: int = 1024
    #: Elements of one array (entries of an append, voters of a snapshot; the message itself
    #: is an array of 13).
    max_array: int = 4096
    #: Arrays and their elements in one message, all together.
    max_items: int = 65_536

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_bin, self.max_str, self.max_items) < 1:
            raise ValueError("every decode limit must be at least 1")
        if self.max_array < _FIELDS:
            raise ValueError(
                f"max_array must be at least {_FIELDS}: a message has {_FIELDS} fields"
            )


#: What ``decode_message`` allows unless told otherwise.
DECODE_LIMITS = DecodeLimits()


class CodecError(ValueError):
    """Bytes that are not a valid encoded ``Message``."""


class MessageTooLarge(CodecError):
    """An encoded message exceeds the configured size limit."""


class TooManyItems(CodecError):
    """A message holds more arrays and array elements than ``DecodeLimits.max_items``."""


def _item_budget(budget: int) -> Callable[[list[Any]], list[Any]]:
    """msgpack's ``list_hook``: counts every array as it is built and stops the decoder (by
    raising) once the message has used its budget, so the waste is at most one array. (A
    closure: the cheapest callable msgpack can call once per array.)"""
    left = budget

    def hook(items: list[Any]) -> list[Any]:
        nonlocal left
        left -= 1 + len(items)
        if left < 0:
            raise TooManyItems("message holds more arrays and elements than allowed")
        return items

    return hook


def encode_message(msg: Message) -> bytes:
    """Encode ``msg``; the inverse of :func:`decode_message`."""
    snap = msg.snapshot
    wire_snap: list[Any] | None = None
    if snap is not None:
        meta = snap.meta
        wire_snap = [meta.index, meta.term, meta.conf.voters, meta.conf.learners, snap.data]
    out: bytes = msgpack.packb(
        (
            VERSION,
            msg.type,
            msg.to,
            msg.frm,
            msg.term,
            msg.log_term,
            msg.index,
            [(e.term, e.index, e.type, e.data) for e in msg.entries],
            msg.commit,
            msg.reject,
            msg.reject_hint,
            wire_snap,
            msg.context,
        ),
        use_bin_type=True,
    )
    return out


#: Most bytes msgpack spends around one entry (array header, three ints, a bin header), and
#: around a message's fixed fields (array header, nine ints or bools, three str/bin headers).
_ENTRY_OVERHEAD = 1 + 3 * 9 + 5
_MESSAGE_OVERHEAD = 1 + 9 * 9 + 3 * 5 + 16


def message_size(msg: Message) -> int:
    """An upper bound on ``len(encode_message(msg))``, without encoding it: lets a sender
    refuse a message that will not fit before anything (a channel counter) is spent on it."""
    size = _MESSAGE_OVERHEAD + len(msg.to) * 4 + len(msg.frm) * 4 + len(msg.context)
    for entry in msg.entries:
        size += _ENTRY_OVERHEAD + len(entry.data)
    snap = msg.snapshot
    if snap is not None:
        conf = snap.meta.conf
        names = sum(len(n) * 4 + 5 for n in (*conf.voters, *conf.learners))
        size += 1 + 2 * 9 + 2 * 5 + names + 5 + len(snap.data)
    return size


def _int(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value < _U63:
        raise CodecError(f"{name} must be an integer in [0, 2^63), got {value!r:.40}")
    return value


def _bytes(value: object, name: str, limit: int) -> bytes:
    if type(value) is not bytes:
        raise CodecError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise CodecError(f"{name} is {len(value)} bytes, limit {limit}")
    return value


def _node(value: object, name: str) -> str:
    if type(value) is not str or len(value) > MAX_NODE_ID:
        raise CodecError(f"{name} must be a node id string of at most {MAX_NODE_ID} chars")
    return value


def _array(value: object, name: str, length: int | None = None) -> list[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        want = f"an array of {length}" if length is not None else "an array"
        raise CodecError(f"{name} must be {want}, got {value!r:.40}")
    return value


def _entries(value: object, max_bytes: int) -> tuple[Entry, ...]:
    items = _array(value, "entries")
    out = []
    for item in items:
        # Fast path for well-formed entries; the checks below name what is wrong otherwise.
        if type(item) is list and len(item) == 4:
            term, index, etype, data = item
            if (
                type(term) is int
                and type(index) is int
                and 0 <= term < _U63
                and 0 <= index < _U63
                and type(data) is bytes
            ):
                et = _ENTRY_TYPES.get(etype) if type(etype) is int else None
                if et is not None:
                    out.append(Entry(term, index, et, data))
                    continue
        fields = _array(item, "entry", 4)
        _int(fields[0], "entry term")
        _int(fields[1], "entry index")
        _bytes(fields[3], "entry data", max_bytes)
        raise CodecError(f"unknown entry type {fields[2]!r:.40}")
    return tuple(out)


def _members(value: object, name: str) -> tuple[str, ...]:
    items = _array(value, name)
    if len(items) > MAX_MEMBERS:
        raise CodecError(f"{name} has {len(items)} members, limit {MAX_MEMBERS}")
    return tuple(_node(v, name) for v in items)


def _snapshot(value: object, max_bytes: int) -> Snapshot | None:
    if value is None:
        return None
    index, term, voters, learners, data = _array(value, "snapshot", 5)
    meta = SnapshotMeta(
        index=_int(index, "snapshot index"),
        term=_int(term, "snapshot term"),
        conf=ConfState(voters=_members(voters, "voters"), learners=_members(learners, "learners")),
    )
    return Snapshot(meta=meta, data=_bytes(data, "snapshot data", max_bytes))


def decode_message(
    data: bytes, *, max_bytes: int | None = None, limits: DecodeLimits = DECODE_LIMITS
) -> Message:
    """Decode and validate one message; raises ``CodecError`` on anything malformed.
    ``max_bytes``, if given, replaces ``limits.max_bytes``."""
    if max_bytes is None:
        max_bytes = limits.max_bytes
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message is {len(data)} bytes, limit {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Every item takes at least one byte, so a message no longer than the budget
            # cannot exceed it: only longer ones pay for counting.
            list_hook=_item_budget(limits.max_items) if len(data) > limits.max_items else None,
            max_str_len=limits.max_str,
            max_bin_len=min(limits.max_bin, max_bytes),
            max_array_len=limits.max_array,
            max_map_len=0,
            max_ext_len=0,
        )
    except TooManyItems as exc:
        raise TooManyItems(f"{exc} ({limits.max_items})") from None
    except Exception as exc:  # msgpack raises a zoo of types for bad input; all mean "malformed"
        raise CodecError(f"not a msgpack message: {exc}") from exc
    fields = _array(obj, "message", _FIELDS)
    (version, mtype, to, frm, term, log_term, index, entries, commit, reject, hint, snap, ctx) = (
        fields
    )
    if version != VERSION or type(version) is not int:
        raise CodecError(f"unsupported codec version {version!r:.40}")
    msg_type = _MESSAGE_TYPES.get(mtype) if type(mtype) is int else None
    if msg_type is None:
        raise CodecError(f"unknown message type {mtype!r:.40}")
    if type(reject) is not bool:
        raise CodecError("reject must be a boolean")
    return Message(
        type=msg_type,
        to=_node(to, "to"),
        frm=_node(frm, "frm"),
        term=_int(term, "term"),
        log_term=_int(log_term, "log_term"),
        index=_int(index, "index"),
        entries=_entries(entries, max_bytes),
        commit=_int(commit, "commit"),
        reject=reject,
        reject_hint=_int(hint, "reject_hint"),
        snapshot=_snapshot(snap, max_bytes),
        context=_bytes(ctx, "context", MAX_CONTEXT),
    )


__all__ = [
    "DECODE_LIMITS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CodecError",
    "DecodeLimits",
    "MessageTooLarge",
    "TooManyItems",
    "decode_message",
    "encode_message",
]
