"""Plain data shared by the Raft core, its storage, its driver and the simulator.

These types are the contract between the pure core (``consensus/raft.py``) and everything that
does I/O around it, in the manner of etcd-io/raft's ``raftpb``: the core never touches a disk or
a socket, it only consumes ``Message`` values and emits ``Ready`` batches built from these types.
Everything is immutable so a ``Ready`` can be handed to another task without defensive copies.

Node ids are the node names from cluster.yaml (strings): they are what operators see in logs
and what the attested channels are keyed by, so there is no second numbering to keep in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

NodeId = str

#: Sentinel for "no node" (no vote cast, no known leader).
NONE: NodeId = ""


class EntryType(IntEnum):
    """Why an entry is in the log; the state machine only ever sees NORMAL entries' data."""

    NORMAL = 0
    #: The empty entry a new leader appends so it can commit entries of earlier terms.
    NOOP = 1
    #: A membership change; ``data`` is an encoded ``ConfChange``.
    CONF_CHANGE = 2


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """The state Raft must have on disk before it answers any message (Raft paper, Fig. 2)."""

    term: int = 0
    vote: NodeId = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership in force at some log position."""

    voters: tuple[NodeId, ...] = ()
    learners: tuple[NodeId, ...] = ()


class ConfChangeType(IntEnum):
    ADD_NODE = 0
    REMOVE_NODE = 1
    ADD_LEARNER = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    type: ConfChangeType
    node: NodeId


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State-machine image at ``meta.index``; ``data`` is opaque to Raft."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        return self.meta.index == 0


class MessageType(IntEnum):
    PRE_VOTE = 1
    PRE_VOTE_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    SNAPSHOT_RESP = 10
    TIMEOUT_NOW = 11
    READ_INDEX = 12
    READ_INDEX_RESP = 13
    #: Forwarded proposal from a follower to the leader.
    PROPOSE = 14
    #: Leadership transfer request forwarded to the leader.
    TRANSFER_LEADER = 15


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft RPC. Fields unused by a given type keep their defaults.

    ``reject_hint`` carries the follower's hint for fast log backtracking (the index the leader
    should retry from); ``context`` carries read-index request ids and campaign reasons.
    """

    type: MessageType
    to: NodeId
    frm: NodeId
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the local applied index reaches ``index``."""

    index: int
    request_ctx: bytes


class Role(IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting (status pages, metrics) but never persisted."""

    leader: NodeId = NONE
    role: Role = Role.FOLLOWER


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the driver must do after a batch of inputs, in this order:

    1. persist ``snapshot`` (if any), then ``entries``, then ``hard_state`` (if any), with one
       fsync covering them (group commit) when ``must_sync``; without it (a hard state whose
       only change is the commit index) the write need not be synced;
    2. only then send ``messages`` (a node must not acknowledge what is not durable), except
       when ``send_first``: a leader that already led when the previous Ready was made may send
       first, so followers write while it writes (its term and vote are durable already);
    3. apply ``committed_entries`` to the state machine and serve ``read_states``;
    4. call ``advance(ready)`` on the core.

    ``must_sync`` and ``send_first`` are decided by the core, once, for every driver (the node,
    the benchmarks, the simulator): what must be durable before a message leaves is not
    something each driver may get subtly different.
    """

    hard_state: HardState | None = None
    soft_state: SoftState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    #: Entries, a snapshot, or a new term or vote: durable (fsynced) before ``messages`` leave
    #: (etcd's ``MustSync``). A change of the commit index alone may be lost in a crash (the
    #: leader sends it again), so it is written without an fsync of its own.
    must_sync: bool = False
    #: This node led before this Ready and still leads in the same term: it may send
    #: ``messages`` before persisting (Raft dissertation 10.2.1); the core counts its own log
    #: toward commit only up to what ``advance`` reports durable.
    send_first: bool = False

    @property
    def has_writes(self) -> bool:
        """Anything to write to the log (synced or not)."""
        return bool(self.entries) or self.hard_state is not None or self.snapshot is not None

    @property
    def is_empty(self) -> bool:
        return not (
            self.hard_state
            or self.soft_state
            or self.entries
            or self.snapshot
            or self.messages
            or self.committed_entries
            or self.read_states
        )


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What a node reads back from its durable log at start-up to rebuild its core."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    #: Entries after ``snapshot.meta.index``, contiguous and in index order.
    entries: tuple[Entry, ...] = ()


class RaftError(Exception):
    """Base of the errors the consensus layer raises to its callers."""


class NotLeader(RaftError):
    """A proposal reached a node that is not the leader; ``leader`` is its best hint (or NONE)."""

    def __init__(self, leader: NodeId) -> None:
        super().__init__(f"not the leader; leader hint: {leader or 'unknown'}")
        self.leader = leader


class ProposalDropped(RaftError):
    """A proposal was accepted but a later leader overwrote it before it could commit."""


class ProposalTimeout(RaftError):
    """A proposal did not commit within the caller's deadline; it may still commit later."""
