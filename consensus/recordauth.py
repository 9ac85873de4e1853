"""Authenticated log records: a keyed MAC chained through every record of the Raft log.

The host stores a node's log, and a hostile host may edit it between runs. The CRC framing of
``consensus.segments`` tells a torn write from damage, but anyone can recompute a CRC. With a
``RecordAuth`` (a MAC under a key only the node's enclave holds), every record carries a tag
over the previous record's tag and its own payload, so the log is one chain:

* a changed record, or a record from another node's log (another key), fails its tag;
* records removed, inserted or reordered break the chain at the first one out of place;
* every segment starts with a chain record naming its sequence number and the tag it carries
  on from the segment before it, so a segment removed from the middle, replaced by another
  node's, or renamed, is refused as well.

What a MAC chain cannot show: that records were cut from the end (the chain is intact up to
there), or that an older copy of the whole log was put back. Raft tolerates a lost tail on one
node (a quorum holds every acknowledged entry), as it tolerates a lost fsync; a rollback of
most of a cluster's logs at once needs a monotonic counter the simulation does not have.

Pure: no I/O. The storage layer decides what to do with the verdicts.
"""

from __future__ import annotations

import hmac
import struct
from typing import Protocol

#: Bytes of the tag appended to every record of an authenticated log.
TAG_SIZE = 16
#: The record kind of a segment's first record in an authenticated log.
REC_CHAIN = 4
_CHAIN = struct.Struct("<BQ")
#: The chain value before a log's very first record.
GENESIS_TAG = bytes(TAG_SIZE)


class RecordAuth(Protocol):
    """A MAC under a key the storage never sees: ``tag(data)`` is ``TAG_SIZE`` bytes."""

    def tag(self, data: bytes) -> bytes: ...


def chain_payload(seq: int, carried: bytes) -> bytes:
    """The payload of segment ``seq``'s chain record, carrying the previous segment's last tag."""
    return _CHAIN.pack(REC_CHAIN, seq) + carried


def parse_chain(payload: bytes) -> tuple[int, bytes] | None:
    """(segment sequence, carried tag) of a chain record's payload; None if it is not one."""
    if len(payload) != _CHAIN.size + TAG_SIZE or payload[0] != REC_CHAIN:
        return None
    _, seq = _CHAIN.unpack_from(payload)
    return seq, payload[_CHAIN.size :]


def is_chain_record(framed_payload: bytes) -> bool:
    """Whether a record as read from a segment is a chain record (tag still attached)."""
    return parse_chain(framed_payload[:-TAG_SIZE]) is not None


class Chain:
    """The running state of one log's chain: seal records on the way out, check them back."""

    def __init__(self, auth: RecordAuth, last: bytes = GENESIS_TAG) -> None:
        self.auth = auth
        self.last = last

    def seal(self, payload: bytes) -> bytes:
        """``payload`` with its tag, chained after the last record sealed or checked."""
        tag = self.auth.tag(self.last + payload)
        self.last = tag
        return payload + tag

    def check(self, framed: bytes) -> bytes | None:
        """The payload of ``framed`` if its tag follows the chain (which then moves on);
        None if it does not (the chain stays where it was)."""
        if len(framed) <= TAG_SIZE:
            return None
        payload, tag = framed[:-TAG_SIZE], framed[-TAG_SIZE:]
        if not hmac.compare_digest(self.auth.tag(self.last + payload), tag):
            return None
        self.last = tag
        return payload

    def restart(self, carried: bytes) -> None:
        """Continue from ``carried`` (a segment's chain record, when nothing before it was read)."""
        self.last = carried


__all__ = [
    "GENESIS_TAG",
    "REC_CHAIN",
    "TAG_SIZE",
    "Chain",
    "RecordAuth",
    "chain_payload",
    "is_chain_record",
    "parse_chain",
]
