"""The Raft core: a pure, deterministic state machine in the manner of etcd-io/raft.

Inputs are ``tick()``, ``step(message)`` and the client calls (``propose``, ``read_index`` ...);
the output is a ``Ready`` batch that the driver persists, sends and applies, then acknowledges
with ``advance``. There are no sockets, clocks, threads or hidden randomness: the only source of
randomness is the ``random.Random`` passed in (election timeouts), so a simulator that seeds it
replays a run exactly.

Design choices worth knowing before reading the code:

* **Pre-vote and check-quorum.** A node that times out first asks "would you vote for me?" at
  ``term + 1`` without bumping its own term, so a partitioned node that rejoins cannot force a
  healthy leader to step down. A leader that has not heard from a quorum within an election
  timeout steps down, and followers that heard from a leader within the election timeout ignore
  (pre-)vote requests (the leader lease), unless the request comes from a leadership transfer.
* **Commit by counting only in the current term** (Raft §5.4.2, Figure 8). A new leader appends a
  NOOP so that earlier-term entries commit as soon as that NOOP does.
* **The leader counts its own log only up to what is durable** (``advance``), not what it has
  appended: an entry the leader acknowledged to itself but lost in a crash would otherwise be
  "committed" on a minority.
* **Membership changes take effect when the entry is appended, not when it commits** (Raft
  dissertation §4.1). With single-server changes every majority of the old membership overlaps
  every majority of the new one, so a node may use the newest membership in its log as soon as
  it has it; waiting for commit instead would need joint consensus to be safe. If the entry is
  truncated away, the node goes back to the previous membership. To close the known hole in
  single-server changes across leader changes, a leader proposes a change only after it has
  committed an entry in its own term, and only one change may be uncommitted at a time. A leader
  that removes itself keeps leading (without counting itself) until the removal commits, then
  steps down and hands off with TIMEOUT_NOW to its most up-to-date voter.
* **Read index**: a linearizable read is answered with the commit index once a heartbeat round
  confirms the leader still leads, and only after the leader has committed an entry of its own
  term (before that its commit index may lag what earlier leaders committed).
* **Lost messages need no transport feedback.** A probe that goes unanswered is retried on the
  next heartbeat response; a pipeline whose APPENDs were all lost is reopened one slot per
  heartbeat response; a snapshot that is never acknowledged is given up on after two election
  timeouts and sent again. The simulator drops, duplicates and reorders to keep this honest.
* A steady leader may send a Ready's messages before its own write is durable (the asyncio
  driver does, as etcd does): the leader counts itself only once ``advance`` says the entries
  are stable, so the quorum it commits on is always durable. Everyone else must persist first.
* ``step`` never raises: malformed, misaddressed or stale messages are dropped.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from consensus.confchange import (
    ConfChangeError,
    apply_change,
    decode_conf_change,
    encode_conf_change,
)
from consensus.progress import Progress, ProgressState
from consensus.quorum import VoteResult, committed_index, quorum, tally
from consensus.raftlog import RaftLog
from consensus.types import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    PersistedState,
    RaftError,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

#: ``Message.context`` of a (pre-)vote sent because of a leadership transfer: it overrides the
#: leader lease of the voters, because the current leader asked for this election.
CAMPAIGN_TRANSFER = b"transfer"

#: Heartbeats that confirm leadership for a read carry this prefix and the leader's own
#: sequence number for the read, so an ordinary heartbeat (empty context) can never be mistaken
#: for a confirmation, and two clients that happen to pick the same context cannot collide.
_READ_PREFIX = b"\x01"

_M = MessageType


class ConfChangeRejected(RaftError):
    """A membership change was refused: one is still pending, or it makes no sense now."""


@dataclass(frozen=True)
class RaftConfig:
    """Static parameters of one node's core."""

    id: NodeId
    #: Initial voters (including this node); used only when the persisted state has no
    #: membership. A node joining an existing cluster passes ``()`` and learns the membership
    #: from the log or snapshot the leader sends it.
    peers: tuple[NodeId, ...]
    #: The randomized election timeout is drawn from ``[election_tick, 2 * election_tick)``.
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    #: Entries per APPEND message.
    max_msg_entries: int = 512
    #: Unacknowledged APPENDs per follower in REPLICATE state (pipelining).
    max_inflight: int = 256
    #: Index the application had already applied before a restart (it must not exceed the
    #: persisted commit index); committed entries after it are handed out again.
    applied: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("node id must be non-empty")
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 1 <= heartbeat_tick < election_tick")
        if self.max_msg_entries < 1 or self.max_inflight < 1:
            raise ValueError("max_msg_entries and max_inflight must be positive")


@dataclass(frozen=True)
class PeerStatus:
    """The leader's view of one member's log."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    is_learner: bool


@dataclass(frozen=True)
class Status:
    """A snapshot of the core's state for status pages, metrics and tests."""

    id: NodeId
    term: int
    vote: NodeId
    role: Role
    leader: NodeId
    commit: int
    applied: int
    first_index: int
    last_index: int
    conf: ConfState
    #: Per-member progress; empty unless this node is the leader.
    progress: Mapping[NodeId, PeerStatus] = field(default_factory=dict)
    lead_transferee: NodeId = NONE


@dataclass
class _ReadRequest:
    index: int
    frm: NodeId
    ctx: bytes
    acks: set[NodeId]


class RaftCore:
    """One node's Raft state machine. See the module docstring for the design."""

    def __init__(
        self, config: RaftConfig, rng: random.Random, state: PersistedState | None = None
    ) -> None:
        self.config = config
        self.id = config.id
        self._rng = rng
        st = state if state is not None else PersistedState()
        self.log = RaftLog(st.snapshot, st.entries)
        hs = st.hard_state
        self.term = hs.term
        self.vote = hs.vote
        snap_idx = self.log.snapshot_index
        self.log.commit = min(max(hs.commit, snap_idx), self.log.last_index)
        self.log.applied = min(max(config.applied, snap_idx), self.log.commit)
        self._applying = self.log.applied

        snap_conf = st.snapshot.meta.conf
        if snap_idx > 0 and (snap_conf.voters or snap_conf.learners):
            self._conf_base = snap_conf
        else:
            self._conf_base = ConfState(voters=tuple(sorted(set(config.peers))))
        #: (index, membership) of each CONF_CHANGE entry in the log, in index order.
        self._conf_history: list[tuple[int, ConfState]] = []
        self._record_conf_entries(self.log.entries)

        self.role = Role.FOLLOWER
        self.lead: NodeId = NONE
        self.progress: dict[NodeId, Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self.lead_transferee: NodeId = NONE
        self._pending_conf_index = 0
        self._reads: OrderedDict[int, _ReadRequest] = OrderedDict()
        self._read_seq = 0
        self._queued_reads: list[tuple[bytes, NodeId]] = []
        self._bcast_pending = False

        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_snapshot: Snapshot | None = None
        self._offered_hs = hs
        self._offered_ss = SoftState()
        self._become_follower(self.term, NONE)

    # ------------------------------------------------------------------ membership helpers

    @property
    def conf(self) -> ConfState:
        """The membership in force: the newest one in the log (append-time semantics)."""
        if self._conf_history:
            return self._conf_history[-1][1]
        return self._conf_base

    def conf_at(self, index: int) -> ConfState:
        """The membership in force at log position ``index`` (for snapshots)."""
        for idx, conf in reversed(self._conf_history):
            if idx <= index:
                return conf
        return self._conf_base

    @property
    def promotable(self) -> bool:
        """Only a voter may campaign; learners and removed nodes stay followers."""
        return self.id in self.conf.voters

    def _record_conf_entries(self, entries: list[Entry] | tuple[Entry, ...]) -> bool:
        changed = False
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                decoded = decode_conf_change(e.data)
                if decoded is not None:
                    self._conf_history.append((e.index, decoded[1]))
                    changed = True
        return changed

    def _append_to_log(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Append (possibly overwriting a conflicting tail) and keep the membership in sync."""
        first = self.log.append(entries)
        changed = False
        while self._conf_history and self._conf_history[-1][0] >= first:
            self._conf_history.pop()
            changed = True
        if self._record_conf_entries(entries):
            changed = True
        if changed:
            self._on_conf_changed()

    def _on_conf_changed(self) -> None:
        if self.role != Role.LEADER:
            return
        conf = self.conf
        # Iterate tuples, never sets: set order depends on the process's hash seed, and message
        # order must be reproducible for the simulator to replay a seed.
        members = (*conf.voters, *conf.learners)
        for node in list(self.progress):
            if node not in members:
                del self.progress[node]
        for node in members:
            learner = node in conf.learners
            pr = self.progress.get(node)
            if pr is None:
                pr = Progress(self.log.last_index + 1, self.config.max_inflight, learner)
                pr.recent_active = True
                if node == self.id:
                    pr.match = self.log.stable
                    pr.become_replicate()
                self.progress[node] = pr
            pr.is_learner = learner
        if self.lead_transferee and self.lead_transferee not in conf.voters:
            self.lead_transferee = NONE
        # A quorum may have changed size: what was not committed may be now.
        if self._maybe_commit():
            self._bcast_pending = True

    # ------------------------------------------------------------------ role changes

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._rng.randrange(
            self.config.election_tick, 2 * self.config.election_tick
        )
        self._votes = {}
        self.progress = {}
        self.lead_transferee = NONE
        self._reads.clear()
        self._queued_reads.clear()
        self._bcast_pending = False

    def _become_follower(self, term: int, lead: NodeId) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def _become_pre_candidate(self) -> None:
        # Not a real election: term and vote stay as they are (that is the point of pre-vote).
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.log.last_index
        conf = self.conf
        for node in (*conf.voters, *conf.learners):
            pr = Progress(last + 1, self.config.max_inflight, node in conf.learners)
            pr.recent_active = True
            self.progress[node] = pr
        me = self.progress.get(self.id)
        if me is not None:
            me.match = self.log.stable
            me.become_replicate()
        # Any membership change in the uncommitted tail counts as pending until the NOOP commits.
        self._pending_conf_index = last
        self._append_to_log([Entry(self.term, last + 1, EntryType.NOOP)])
        self._bcast_append()

    def _campaign(self, transfer: bool) -> None:
        if not self.promotable or self.role == Role.LEADER:
            return
        if self.config.pre_vote and not transfer:
            self._become_pre_candidate()
            self._solicit(_M.PRE_VOTE, self.term + 1, b"")
        else:
            self._become_candidate()
            self._solicit(_M.VOTE, self.term, CAMPAIGN_TRANSFER if transfer else b"")

    def _solicit(self, kind: MessageType, vote_term: int, ctx: bytes) -> None:
        """Vote for ourselves and ask every other voter (a single voter wins at once)."""
        self._votes[self.id] = True
        if self._tally_and_act():
            return
        last_index, last_term = self.log.last_index, self.log.last_term
        for node in self.conf.voters:
            if node != self.id:
                self._send(
                    Message(
                        kind,
                        to=node,
                        frm=self.id,
                        term=vote_term,
                        index=last_index,
                        log_term=last_term,
                        context=ctx,
                    )
                )

    def _tally_and_act(self) -> bool:
        """Act on the votes so far; True if the election is decided."""
        result = tally(self.conf.voters, self._votes)
        if result == VoteResult.WON:
            if self.role == Role.PRE_CANDIDATE:
                # The pre-vote says we can win: now run the real election.
                self._become_candidate()
                self._solicit(_M.VOTE, self.term, b"")
            else:
                self._become_leader()
            return True
        if result == VoteResult.LOST:
            self._become_follower(self.term, NONE)
            return True
        return False

    # ------------------------------------------------------------------ public API

    def tick(self) -> None:
        """Advance logical time by one tick (the driver calls this at a fixed interval)."""
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self.promotable and self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._campaign(transfer=False)

    def campaign(self) -> None:
        """Start an election now (with pre-vote if configured)."""
        self._campaign(transfer=False)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a NORMAL entry; returns its (term, index). Raises ``NotLeader`` elsewhere.

        The entry is committed when a committed entry at that index carries that term; if a
        different term shows up there, a later leader replaced it and the proposal is lost.
        """
        self._check_can_propose()
        index = self.log.last_index + 1
        self._append_to_log([Entry(self.term, index, EntryType.NORMAL, data)])
        self._bcast_pending = True
        return self.term, index

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        """Append a single-server membership change; returns its (term, index).

        Raises ``NotLeader`` on a non-leader and ``ConfChangeRejected`` if a change is still
        uncommitted, the leader has not committed an entry in its term yet, or the change does
        not apply to the current membership (adding a member twice, removing the last voter).
        """
        self._check_can_propose()
        if self.log.term(self.log.commit) != self.term:
            raise ConfChangeRejected("leader has not committed an entry in its term yet")
        if self._pending_conf_index > self.log.commit:
            raise ConfChangeRejected("a membership change is still uncommitted")
        try:
            new_conf = apply_change(self.conf, cc)
        except ConfChangeError as exc:
            raise ConfChangeRejected(str(exc)) from exc
        index = self.log.last_index + 1
        entry = Entry(self.term, index, EntryType.CONF_CHANGE, encode_conf_change(cc, new_conf))
        self._pending_conf_index = index
        self._append_to_log([entry])
        self._bcast_pending = True
        return self.term, index

    def transfer_leadership(self, to: NodeId) -> None:
        """Ask the leader to hand leadership to ``to`` (forwarded if this node is a follower)."""
        if self.role == Role.LEADER:
            self._leader_transfer(to)
        elif self.lead:
            self._send(Message(_M.TRANSFER_LEADER, to=self.lead, frm=self.id, context=to.encode()))

    def read_index(self, ctx: bytes) -> None:
        """Request a linearizable read; ``ReadState(index, ctx)`` appears in a later Ready.

        Serve the read once the applied index reaches ``index``. On a follower the request is
        forwarded to the leader; with no known leader it is dropped and the caller times out.
        """
        if self.role == Role.LEADER:
            self._leader_read(ctx, self.id)
        elif self.lead:
            self._send(Message(_M.READ_INDEX, to=self.lead, frm=self.id, context=ctx))

    def has_ready(self) -> bool:
        log = self.log
        return bool(
            self._msgs
            or self._read_states
            or self._pending_snapshot is not None
            or self._bcast_pending
            or log.offered < log.last_index
            or log.commit > self._applying
            or self._offered_hs.term != self.term
            or self._offered_hs.vote != self.vote
            or self._offered_hs.commit != log.commit
            or self._offered_ss.leader != self.lead
            or self._offered_ss.role != self.role
        )

    def ready(self) -> Ready:
        """Collect everything to persist, send and apply since the last ``ready()``.

        Call ``advance`` with the result once it is done, before the next ``ready()``.
        """
        if self._bcast_pending and self.role == Role.LEADER:
            self._bcast_append()
        self._bcast_pending = False
        log = self.log
        entries = log.unstable_entries()
        hs = HardState(self.term, self.vote, log.commit)
        hs_out = hs if hs != self._offered_hs else None
        ss = SoftState(self.lead, self.role)
        ss_out = ss if ss != self._offered_ss else None
        committed: tuple[Entry, ...] = ()
        if log.commit > self._applying:
            committed = log.slice(self._applying + 1, log.commit + 1)
        previous = self._offered_hs
        must_sync = (
            bool(entries)
            or self._pending_snapshot is not None
            or (hs.term, hs.vote) != (previous.term, previous.vote)
        )
        send_first = (
            self.role == Role.LEADER
            and self._offered_ss.role == Role.LEADER
            and previous.term == self.term
        )
        rd = Ready(
            hard_state=hs_out,
            soft_state=ss_out,
            entries=entries,
            snapshot=self._pending_snapshot,
            messages=tuple(self._msgs),
            committed_entries=committed,
            read_states=tuple(self._read_states),
            must_sync=must_sync,
            send_first=send_first,
        )
        self._msgs = []
        self._read_states = []
        self._pending_snapshot = None
        log.offered = log.last_index
        self._applying = max(self._applying, log.commit)
        self._offered_hs = hs
        self._offered_ss = ss
        return rd

    def advance(self, ready: Ready) -> None:
        """The driver has persisted, sent and applied ``ready``."""
        log = self.log
        if ready.snapshot is not None and log.snapshot_index == ready.snapshot.meta.index:
            log.stable = max(log.stable, ready.snapshot.meta.index)
            log.applied = max(log.applied, ready.snapshot.meta.index)
        if ready.entries:
            last = ready.entries[-1]
            log.stable_to(last.index, last.term)
        if ready.committed_entries:
            log.applied = max(log.applied, ready.committed_entries[-1].index)
        if self.role == Role.LEADER:
            me = self.progress.get(self.id)
            if me is not None and me.maybe_update(log.stable) and self._maybe_commit():
                self._bcast_pending = True

    def compact(self, snapshot: Snapshot) -> None:
        """The application saved a snapshot at ``snapshot.meta.index``: drop the log before it.

        The index must be applied. Build the metadata with ``snapshot_meta(index)``; a snapshot
        given with an empty membership gets the core's, one with a wrong term is refused with
        ``ValueError`` (the application's state and the log would disagree). Compacting at or
        below the current snapshot is a no-op.
        """
        idx = snapshot.meta.index
        if idx <= self.log.snapshot_index:
            return
        if idx > max(self.log.applied, self._applying) or idx > self.log.last_index:
            raise ValueError(f"cannot compact at {idx}: not applied yet")
        meta = self.snapshot_meta(idx)
        if snapshot.meta.term != meta.term:
            raise ValueError(f"snapshot term {snapshot.meta.term} != log term {meta.term}")
        conf = snapshot.meta.conf
        if (conf.voters or conf.learners) and conf != meta.conf:
            raise ValueError("snapshot membership disagrees with the log")
        snap = Snapshot(meta, snapshot.data)
        self._conf_base = meta.conf
        self._conf_history = [(i, c) for i, c in self._conf_history if i > idx]
        self.log.compact(snap)

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        """Metadata for a snapshot at ``index`` (which must still be in the log)."""
        term = self.log.term(index)
        if term is None:
            raise ValueError(f"index {index} is not in the log")
        return SnapshotMeta(index=index, term=term, conf=self.conf_at(index))

    @property
    def status(self) -> Status:
        progress: dict[NodeId, PeerStatus] = {}
        if self.role == Role.LEADER:
            for node, pr in self.progress.items():
                progress[node] = PeerStatus(
                    pr.match, pr.next, pr.state, pr.recent_active, pr.is_learner
                )
        return Status(
            id=self.id,
            term=self.term,
            vote=self.vote,
            role=self.role,
            leader=self.lead,
            commit=self.log.commit,
            applied=self.log.applied,
            first_index=self.log.first_index,
            last_index=self.log.last_index,
            conf=self.conf,
            progress=progress,
            lead_transferee=self.lead_transferee,
        )

    # ------------------------------------------------------------------ stepping

    def step(self, m: Message) -> None:
        """Process one message; malformed, misaddressed and stale messages are ignored."""
        if not _well_formed(m, self.id):
            return
        if m.term == 0:
            # Term-less forwards (proposal, read index, transfer) are treated as local requests.
            if m.type in (_M.PROPOSE, _M.READ_INDEX, _M.TRANSFER_LEADER):
                self._step_role(m)
            return
        if m.term > self.term:
            if m.type in (_M.PRE_VOTE, _M.VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.config.check_quorum
                    and self.lead != NONE
                    and self._election_elapsed < self.config.election_tick
                )
                if in_lease and not force:
                    # We heard from a leader recently: do not help anyone depose it.
                    return
            if m.type == _M.PRE_VOTE or (m.type == _M.PRE_VOTE_RESP and not m.reject):
                # A pre-vote never changes anyone's term; a granted response carries the
                # future term the pre-candidate asked about.
                pass
            else:
                lead = m.frm if m.type in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT) else NONE
                self._become_follower(m.term, lead)
        elif m.term < self.term:
            if (self.config.check_quorum or self.config.pre_vote) and m.type in (
                _M.APPEND,
                _M.HEARTBEAT,
            ):
                # A stale leader (e.g. back from a partition) learns the new term this way;
                # without pre-vote it would eventually disrupt us with a higher-term election.
                self._send(Message(_M.APPEND_RESP, to=m.frm, frm=self.id, term=self.term))
            elif m.type == _M.PRE_VOTE:
                self._send(
                    Message(_M.PRE_VOTE_RESP, to=m.frm, frm=self.id, term=self.term, reject=True)
                )
            return

        if m.type in (_M.PRE_VOTE, _M.VOTE):
            self._handle_vote_request(m)
            return
        self._step_role(m)

    def _step_role(self, m: Message) -> None:
        if self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == _M.PRE_VOTE
        resp = _M.PRE_VOTE_RESP if pre else _M.VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (pre and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # The response carries the candidate's term so it counts in that election.
            self._send(Message(resp, to=m.frm, frm=self.id, term=m.term))
            if not pre:
                self._election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, to=m.frm, frm=self.id, term=self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == _M.APPEND:
            self._election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif t == _M.HEARTBEAT:
            self._election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t == _M.SNAPSHOT:
            self._election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == _M.TIMEOUT_NOW:
            # The leader asked us to take over: skip pre-vote and override the voters' lease.
            self._campaign(transfer=True)
        elif t == _M.TRANSFER_LEADER:
            if self.lead and m.frm != self.lead:
                self._send(
                    Message(_M.TRANSFER_LEADER, to=self.lead, frm=self.id, context=m.context)
                )
        elif t == _M.READ_INDEX_RESP and m.frm == self.lead:
            self._read_states.append(ReadState(m.index, m.context))
        # PROPOSE / READ_INDEX forwarded to a non-leader are dropped: the sender times out and
        # retries at the leader it learns about, which avoids forwarding loops.

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (_M.APPEND, _M.HEARTBEAT, _M.SNAPSHOT):
            # Someone won this term; follow it.
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        else:
            expected = _M.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else _M.VOTE_RESP
            if t == expected and m.frm in self.conf.voters and m.frm not in self._votes:
                self._votes[m.frm] = not m.reject
                self._tally_and_act()

    # ------------------------------------------------------------------ follower handlers

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.commit:
            self._send(
                Message(_M.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=log.commit)
            )
            return
        if log.match_term(m.index, m.log_term):
            last_new = m.index + len(m.entries)
            conflict = log.find_conflict(m.entries)
            if conflict:
                if conflict <= log.commit:
                    return  # would overwrite a committed entry: a bogus message, ignore it
                self._append_to_log(m.entries[conflict - m.index - 1 :])
            self._commit_to(min(m.commit, last_new))
            self._send(
                Message(_M.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=last_new)
            )
            return
        # Fast backtracking: tell the leader where our log can possibly match, skipping every
        # entry whose term is above the leader's term at m.index (they cannot match).
        hint = log.find_conflict_by_term(min(m.index, log.last_index), m.log_term)
        self._send(
            Message(
                _M.APPEND_RESP,
                to=m.frm,
                frm=self.id,
                term=self.term,
                index=m.index,
                reject=True,
                reject_hint=hint,
                log_term=log.term(hint) or 0,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader sends min(commit, our match), so this never commits an unmatched entry.
        self._commit_to(min(m.commit, self.log.last_index))
        self._send(
            Message(_M.HEARTBEAT_RESP, to=m.frm, frm=self.id, term=self.term, context=m.context)
        )

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        log = self.log
        if snap is None or snap.meta.index <= log.commit:
            self._send(
                Message(_M.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=log.commit)
            )
            return
        meta = snap.meta
        if log.match_term(meta.index, meta.term):
            # We already hold everything the snapshot covers; just learn that it is committed.
            self._commit_to(meta.index)
        else:
            old_stable = log.stable
            log.restore(snap)
            log.stable = min(old_stable, meta.index)
            self._applying = meta.index
            self._pending_snapshot = snap
            self._conf_base = meta.conf
            self._conf_history = []
        self._send(
            Message(_M.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=log.last_index)
        )

    def _commit_to(self, index: int) -> None:
        if index > self.log.commit:
            self.log.commit = index

    # ------------------------------------------------------------------ leader

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee:
            # Leadership is moving; the caller should retry at the new leader.
            raise NotLeader(self.lead_transferee)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        cfg = self.config
        if self._election_elapsed >= cfg.election_tick:
            self._election_elapsed = 0
            if cfg.check_quorum and not self._quorum_active():
                self._become_follower(self.term, NONE)
                return
            # A transfer that has not finished within an election timeout is abandoned.
            self.lead_transferee = NONE
        for pr in self.progress.values():
            if pr.state == ProgressState.SNAPSHOT:
                pr.snapshot_wait += 1
                if pr.snapshot_wait >= 2 * cfg.election_tick:
                    # The snapshot (or its ack) was probably lost: probe again from scratch.
                    pr.state = ProgressState.PROBE
                    pr.become_probe()
                    pr.next = pr.match + 1
        if self._heartbeat_elapsed >= cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat(b"")

    def _quorum_active(self) -> bool:
        voters = self.conf.voters
        active = 0
        for node in voters:
            pr = self.progress.get(node)
            if node == self.id or (pr is not None and pr.recent_active):
                active += 1
        for node, pr in self.progress.items():
            pr.recent_active = node == self.id
        return active >= quorum(len(voters))

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == _M.APPEND_RESP:
            self._handle_append_resp(m)
        elif t == _M.HEARTBEAT_RESP:
            self._handle_heartbeat_resp(m)
        elif t == _M.PROPOSE:
            if self.lead_transferee:
                return
            if m.frm != self.id and m.frm not in self.conf.voters:
                # Only voters may have commands committed through the leader: a learner, a
                # removed member or a node still joining has no say in what the log holds.
                return
            appended = False
            for e in m.entries:
                if e.type == EntryType.NORMAL:
                    idx = self.log.last_index + 1
                    self._append_to_log([Entry(self.term, idx, EntryType.NORMAL, e.data)])
                    appended = True
            if appended:
                self._bcast_pending = True
        elif t == _M.READ_INDEX:
            self._leader_read(m.context, m.frm)
        elif t == _M.TRANSFER_LEADER:
            try:
                target = m.context.decode()
            except UnicodeDecodeError:
                return
            self._leader_transfer(target)
        elif t == _M.SNAPSHOT_RESP:
            pr = self.progress.get(m.frm)
            if pr is not None and pr.state == ProgressState.SNAPSHOT and m.reject:
                pr.become_probe()
                pr.next = pr.match + 1

    def _handle_append_resp(self, m: Message) -> None:
        pr = self.progress.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            probe = m.reject_hint
            if m.log_term > 0:
                probe = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm, send_if_empty=True)
            return
        if m.index > self.log.last_index:
            return
        if pr.maybe_update(m.index):
            snapshot_done = pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot
            if pr.state == ProgressState.PROBE or snapshot_done:
                pr.become_replicate()
            if self._maybe_commit():
                self._bcast_append()
            # Keep the pipe full while there is something to send (bounded by the log length).
            for _ in range(self.log.last_index - pr.match + 1):
                if not self._send_append(m.frm, send_if_empty=False):
                    break
            if pr.sent_commit < min(self.log.commit, pr.match):
                # Nothing left to send, but the follower has not heard the latest commit index.
                self._send_append(m.frm, send_if_empty=True)
            if m.frm == self.lead_transferee and pr.match == self.log.last_index:
                self._send(Message(_M.TIMEOUT_NOW, to=m.frm, frm=self.id, term=self.term))

    def _handle_heartbeat_resp(self, m: Message) -> None:
        pr = self.progress.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if pr.state == ProgressState.PROBE:
            pr.paused = False
        elif pr.state == ProgressState.REPLICATE and pr.inflight_full:
            # The follower is alive but some APPENDs went unanswered (lost, or their answers
            # were): let one more through. If it does not fit the follower's log, its
            # rejection puts the follower back into PROBE and replication resumes from match.
            pr.inflight.popleft()
        if pr.match < self.log.last_index:
            self._send_append(m.frm, send_if_empty=True)
        if len(m.context) == len(_READ_PREFIX) + 8 and m.context.startswith(_READ_PREFIX):
            self._ack_read(int.from_bytes(m.context[len(_READ_PREFIX) :], "big"), m.frm)

    def _send_append(self, to: NodeId, send_if_empty: bool) -> bool:
        """Send the next APPEND (or the snapshot) to ``to``; False if nothing was sent."""
        pr = self.progress.get(to)
        if pr is None or to == self.id or pr.is_paused:
            return False
        log = self.log
        prev = pr.next - 1
        prev_term = log.term(prev)
        if prev_term is None:
            if prev < log.snapshot_index:
                snap = log.snapshot
                self._send(Message(_M.SNAPSHOT, to=to, frm=self.id, term=self.term, snapshot=snap))
                pr.become_snapshot(snap.meta.index)
                return True
            # next ran past our log (cannot happen with well-formed acks): resync by probing.
            pr.become_probe()
            pr.next = pr.match + 1
            prev = pr.next - 1
            prev_term = log.term(prev)
            if prev_term is None:
                return False
        entries = log.slice(pr.next, log.last_index + 1, self.config.max_msg_entries)
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                _M.APPEND,
                to=to,
                frm=self.id,
                term=self.term,
                index=prev,
                log_term=prev_term,
                entries=entries,
                commit=log.commit,
            )
        )
        last_sent = entries[-1].index if entries else prev
        pr.sent(last_sent, len(entries))
        pr.sent_commit = max(pr.sent_commit, min(log.commit, last_sent))
        return True

    def _bcast_append(self) -> None:
        """Send every follower what it is missing, filling its pipeline (or one probe)."""
        for node in self.progress:
            if node != self.id and self._send_append(node, send_if_empty=True):
                for _ in range(self.config.max_inflight):
                    if not self._send_append(node, send_if_empty=False):
                        break

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        commit = self.log.commit
        for node, pr in self.progress.items():
            if node != self.id:
                self._send(
                    Message(
                        _M.HEARTBEAT,
                        to=node,
                        frm=self.id,
                        term=self.term,
                        commit=min(pr.match, commit),
                        context=ctx,
                    )
                )

    def _maybe_commit(self) -> bool:
        """Advance commit to the quorum-replicated index if that entry is of this term."""
        match = {node: pr.match for node, pr in self.progress.items()}
        index = committed_index(self.conf.voters, match)
        if index <= self.log.commit or self.log.term(index) != self.term:
            return False
        self.log.commit = index
        self._on_commit_advanced()
        return True

    def _on_commit_advanced(self) -> None:
        if self._queued_reads:
            queued, self._queued_reads = self._queued_reads, []
            for ctx, frm in queued:
                self._leader_read(ctx, frm)
        conf = self.conf
        if (
            self.id not in conf.voters
            and self.id not in conf.learners
            and self._pending_conf_index <= self.log.commit
        ):
            self._step_down_removed()

    def _step_down_removed(self) -> None:
        """Our own removal committed: hand off to the most caught-up voter and step down."""
        best: NodeId = NONE
        best_match = -1
        for node in self.conf.voters:
            pr = self.progress.get(node)
            if pr is not None and pr.match > best_match:
                best, best_match = node, pr.match
        # Let followers learn the commit index of our removal before we go quiet.
        self._bcast_append()
        if best and best_match == self.log.last_index:
            self._send(Message(_M.TIMEOUT_NOW, to=best, frm=self.id, term=self.term))
        self._become_follower(self.term, NONE)

    def _leader_transfer(self, to: NodeId) -> None:
        if to == self.id or to not in self.conf.voters or to == self.lead_transferee:
            return
        self.lead_transferee = to
        self._election_elapsed = 0
        pr = self.progress.get(to)
        if pr is None:
            return
        if pr.match == self.log.last_index:
            self._send(Message(_M.TIMEOUT_NOW, to=to, frm=self.id, term=self.term))
        else:
            self._send_append(to, send_if_empty=True)

    # ------------------------------------------------------------------ read index

    def _leader_read(self, ctx: bytes, frm: NodeId) -> None:
        if self.log.term(self.log.commit) != self.term:
            # Our commit index may still trail what earlier leaders committed: wait for the
            # NOOP of this term to commit before promising anything.
            self._queued_reads.append((ctx, frm))
            return
        voters = self.conf.voters
        if voters == (self.id,):
            self._deliver_read(ctx, frm, self.log.commit)
            return
        self._read_seq += 1
        seq = self._read_seq
        acks = {self.id} if self.id in voters else set()
        self._reads[seq] = _ReadRequest(self.log.commit, frm, ctx, acks)
        self._bcast_heartbeat(_READ_PREFIX + seq.to_bytes(8, "big"))

    def _ack_read(self, seq: int, frm: NodeId) -> None:
        req = self._reads.get(seq)
        voters = self.conf.voters
        if req is None or frm not in voters:
            return
        req.acks.add(frm)
        if sum(1 for v in voters if v in req.acks) < quorum(len(voters)):
            return
        # Requests are confirmed in order: the heartbeat for this one was sent after all the
        # earlier ones were registered, so a quorum for it confirms them too.
        while self._reads:
            key, r = self._reads.popitem(last=False)
            self._deliver_read(r.ctx, r.frm, r.index)
            if key == seq:
                break

    def _deliver_read(self, ctx: bytes, frm: NodeId, index: int) -> None:
        if frm == self.id:
            self._read_states.append(ReadState(index, ctx))
        else:
            self._send(
                Message(
                    _M.READ_INDEX_RESP,
                    to=frm,
                    frm=self.id,
                    term=self.term,
                    index=index,
                    context=ctx,
                )
            )

    # ------------------------------------------------------------------ output

    def _send(self, m: Message) -> None:
        self._msgs.append(m)


def _nonneg_int(v: object) -> bool:
    return type(v) is int and v >= 0


def _well_formed(m: object, me: NodeId) -> bool:
    """Cheap structural checks so that no message can make the core raise or corrupt itself."""
    if not isinstance(m, Message):
        return False
    if m.to != me or not isinstance(m.frm, str) or not m.frm or m.frm == me:
        return False
    if not isinstance(m.type, MessageType):
        return False
    if not (
        _nonneg_int(m.term)
        and _nonneg_int(m.index)
        and _nonneg_int(m.log_term)
        and _nonneg_int(m.commit)
        and _nonneg_int(m.reject_hint)
    ):
        return False
    if not isinstance(m.context, bytes) or not isinstance(m.entries, tuple):
        return False
    if not isinstance(m.reject, bool):
        return False
    if m.type == _M.APPEND:
        if m.log_term > m.term or (m.index == 0 and m.log_term != 0):
            return False
        prev_term = m.log_term
        expect = m.index + 1
        for e in m.entries:
            if not isinstance(e, Entry) or e.index != expect or not isinstance(e.data, bytes):
                return False
            if not _nonneg_int(e.term) or e.term < prev_term or e.term > m.term or e.term < 1:
                return False
            if not isinstance(e.type, EntryType):
                return False
            prev_term = e.term
            expect += 1
    elif m.type == _M.PROPOSE:
        for e in m.entries:
            if not isinstance(e, Entry) or not isinstance(e.data, bytes):
                return False
            if not isinstance(e.type, EntryType):
                return False
    elif m.type == _M.SNAPSHOT:
        snap = m.snapshot
        if not isinstance(snap, Snapshot) or not isinstance(snap.data, bytes):
            return False
        meta = snap.meta
        if not isinstance(meta, SnapshotMeta) or not isinstance(meta.conf, ConfState):
            return False
        if not (_nonneg_int(meta.index) and _nonneg_int(meta.term)):
            return False
        if meta.index < 1 or meta.term < 1 or meta.term > m.term:
            return False
        voters = meta.conf.voters
        learners = meta.conf.learners
        if not isinstance(voters, tuple) or not isinstance(learners, tuple) or not voters:
            return False
        if not all(isinstance(v, str) and v for v in (*voters, *learners)):
            return False
    return True
