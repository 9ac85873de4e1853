"""Membership changes: the encoding of CONF_CHANGE entries and the rules for applying them.

A CONF_CHANGE entry carries the change *and the membership that results from it*. The resulting
membership makes every such entry self-describing, which matters for a node that joins an
existing cluster: it starts with no idea of the initial voters, and when the leader replicates
the log to it from index 1 it only has to find the latest CONF_CHANGE entry to know the
membership, instead of replaying every change on top of a base it never saw. The leader computes
the result from the membership in force at the end of its log, which is exactly the log prefix
the entry sits on, so every node that holds the entry derives the same membership from it.

The encoding is JSON with sorted keys: deterministic, readable in a log dump, and decoding it
never executes anything. Undecodable data (a corrupt or forged entry) leaves the membership
unchanged, identically on every node that holds the same bytes.
"""

from __future__ import annotations

import json

from consensus.types import ConfChange, ConfChangeType, ConfState, NodeId


class ConfChangeError(ValueError):
    """A membership change that cannot be applied to the current membership."""


def apply_change(conf: ConfState, cc: ConfChange) -> ConfState:
    """The membership after ``cc``; raises ``ConfChangeError`` if ``cc`` makes no sense here.

    Only one server changes at a time (Raft dissertation §4.1), so any majority of the old
    membership overlaps any majority of the new one and no joint consensus is needed.
    """
    voters = list(conf.voters)
    learners = list(conf.learners)
    node = cc.node
    if not node:
        raise ConfChangeError("empty node id")
    if cc.type == ConfChangeType.ADD_NODE:
        if node in voters:
            raise ConfChangeError(f"{node} is already a voter")
        if node in learners:
            learners.remove(node)  # promotion of a caught-up learner
        voters.append(node)
    elif cc.type == ConfChangeType.ADD_LEARNER:
        if node in voters:
            raise ConfChangeError(f"{node} is a voter; demotion is not supported")
        if node in learners:
            raise ConfChangeError(f"{node} is already a learner")
        learners.append(node)
    elif cc.type == ConfChangeType.REMOVE_NODE:
        if node in voters:
            if len(voters) == 1:
                raise ConfChangeError("cannot remove the last voter")
            voters.remove(node)
        elif node in learners:
            learners.remove(node)
        else:
            raise ConfChangeError(f"{node} is not a member")
    else:  # pragma: no cover - IntEnum exhausts the cases
        raise ConfChangeError(f"unknown change type {cc.type!r}")
    return ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))


def encode_conf_change(cc: ConfChange, result: ConfState) -> bytes:
    """Entry data for a CONF_CHANGE entry: the change and the membership it produces."""
    doc = {
        "type": int(cc.type),
        "node": cc.node,
        "voters": list(result.voters),
        "learners": list(result.learners),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _str_tuple(value: object) -> tuple[NodeId, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return None
    return tuple(value)


def decode_conf_change(data: bytes) -> tuple[ConfChange, ConfState] | None:
    """Inverse of ``encode_conf_change``; ``None`` for anything malformed (never raises)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    kind, node = doc.get("type"), doc.get("node")
    if not isinstance(kind, int) or isinstance(kind, bool) or not isinstance(node, str):
        return None
    try:
        cc_type = ConfChangeType(kind)
    except ValueError:
        return None
    voters = _str_tuple(doc.get("voters"))
    learners = _str_tuple(doc.get("learners"))
    if voters is None or learners is None or not voters:
        return None
    return ConfChange(cc_type, node), ConfState(voters=voters, learners=learners)
