"""What a leader knows about each follower's log, and how fast it may send to it.

A follower is in one of three states (as in etcd-io/raft):

* PROBE: the leader does not know where the logs match; it sends one APPEND at a time and waits
  for the answer (or the next heartbeat response) before sending another, so a follower that
  is far behind is not flooded with appends it must reject.
* REPLICATE: the logs match up to ``match``; the leader streams APPENDs optimistically, up to
  ``max_inflight`` unacknowledged messages (pipelining), advancing ``next`` as it sends.
* SNAPSHOT: the entries the follower needs are compacted away; a snapshot is on its way and
  nothing else is sent until it is acknowledged or given up on after a timeout.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum


class ProgressState(IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Progress:
    """Replication state of one peer, kept by the leader."""

    __slots__ = (
        "inflight",
        "is_learner",
        "match",
        "max_inflight",
        "next",
        "paused",
        "pending_snapshot",
        "recent_active",
        "sent_commit",
        "snapshot_wait",
        "state",
    )

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.snapshot_wait = 0
        self.recent_active = False
        #: highest commit index this follower can have learned from what we sent it
        self.sent_commit = 0
        self.is_learner = is_learner
        self.max_inflight = max(1, max_inflight)
        #: last index of each unacknowledged APPEND, oldest first
        self.inflight: deque[int] = deque()

    def become_probe(self) -> None:
        # After a snapshot the follower holds at least the snapshot index; start after it.
        if self.state == ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.pending_snapshot = 0
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_wait = 0
        self.paused = False
        self.inflight.clear()

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged entries up to ``index``; False if that is old news."""
        updated = False
        if index > self.match:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        return updated

    def maybe_decr_to(self, rejected: int, hint: int) -> bool:
        """The follower rejected an APPEND whose previous index was ``rejected``.

        Returns False for a stale rejection (of an APPEND sent before some later success or an
        earlier probe), which must not move ``next`` backwards.
        """
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            # Pipelined appends after the mismatch are useless; restart right after match.
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        # The answer to the current probe. A follower whose disk lost entries it had
        # acknowledged rejects at or below ``match``: believe it rather than our record of
        # ``match`` (etcd keeps ``next`` above ``match``, and would re-send the same probe at
        # network speed forever). Lowering ``match`` is always safe: it can only delay a
        # commit, and the commit index never moves back.
        self.next = max(min(rejected, hint + 1), 1)
        self.match = min(self.match, self.next - 1)
        self.paused = False
        return True

    def sent(self, last: int, count: int) -> None:
        """Record an APPEND that carried ``count`` entries ending at ``last``."""
        if self.state == ProgressState.REPLICATE:
            if count:
                self.next = last + 1
                self.inflight.append(last)
        elif self.state == ProgressState.PROBE:
            self.paused = True

    @property
    def inflight_full(self) -> bool:
        return len(self.inflight) >= self.max_inflight

    @property
    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.paused
        if self.state == ProgressState.REPLICATE:
            return len(self.inflight) >= self.max_inflight
        return True

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.name}, "
            f"inflight={len(self.inflight)})"
        )
