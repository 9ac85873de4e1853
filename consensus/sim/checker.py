"""Safety properties checked over a whole simulated run (Raft paper, Figure 3), plus reads.

The simulator reports what it observes; the checker remembers just enough global history to
catch a violation the moment it happens:

* **Election safety**: at most one leader per term.
* **Log matching**: two logs holding an entry with the same index and term hold the same entry
  and agree on the term of the entry before it (which, by induction, makes the prefixes equal).
  Checked on every entry any node persists.
* **Leader completeness**: a new leader of term T holds every entry that a leader of an earlier
  term committed.
* **State-machine safety**: every node applies the same entry at each index, in index order,
  and installs snapshots whose digest matches the cluster's digest at that index.
* **Linearizable reads**: a read index is at least the highest index committed anywhere when
  the read was requested.

(A node writing a different entry at an index that is already committed elsewhere is *not* a
violation by itself: a deposed leader that has not heard of its successor still appends to its
own log. What must never happen is such a node leading a later term or applying the entry,
which the checks above catch.)

Liveness is the simulator's business (it needs the clock); it reports failures here too.
"""

from __future__ import annotations

from consensus.raftlog import RaftLog
from consensus.sim.appstate import chain
from consensus.types import Entry, EntryType, NodeId

_Content = tuple[int, EntryType, bytes]


class Checker:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.leader_of_term: dict[int, NodeId] = {}
        #: (index, term) -> (term of index-1 or -1 if unknown, type, data)
        self._entries: dict[tuple[int, int], tuple[int, EntryType, bytes]] = {}
        #: index -> (term, type, data) of the committed entry
        self.committed: dict[int, _Content] = {}
        #: index -> term of the leader that committed it (when a leader reported it)
        self._commit_term: dict[int, int] = {}
        #: index -> state-machine digest after applying it
        self._digest: dict[int, bytes] = {}
        self.max_commit = 0
        self.reads_checked = 0

    def fail(self, what: str) -> None:
        self.violations.append(what)

    # -- elections ------------------------------------------------------------------------

    def on_leader(self, node: NodeId, term: int, log: RaftLog) -> None:
        other = self.leader_of_term.get(term)
        if other is not None and other != node:
            self.fail(f"election safety: {other} and {node} both lead term {term}")
            return
        self.leader_of_term[term] = node
        for index, commit_term in self._commit_term.items():
            if commit_term >= term or index < log.first_index:
                continue
            want = self.committed[index][0]
            have = log.term(index)
            if have != want:
                self.fail(
                    f"leader completeness: {node} leads term {term} without the entry "
                    f"committed at {index} (term {want}); its log has term {have}"
                )
                return

    # -- logs -----------------------------------------------------------------------------

    def on_persist(self, node: NodeId, entries: tuple[Entry, ...], log: RaftLog) -> None:
        """``node`` wrote ``entries``; ``log`` is its in-memory log right now."""
        for e in entries:
            prev = log.term(e.index - 1)
            prev_term = -1 if prev is None else prev
            key = (e.index, e.term)
            seen = self._entries.get(key)
            if seen is None:
                self._entries[key] = (prev_term, e.type, e.data)
            else:
                if seen[1] != e.type or seen[2] != e.data:
                    self.fail(f"log matching: {node} holds a different entry at {key}")
                elif seen[0] >= 0 and prev_term >= 0 and seen[0] != prev_term:
                    self.fail(
                        f"log matching: {node} has term {prev_term} before {key}, "
                        f"another node had {seen[0]}"
                    )
                elif seen[0] < 0 <= prev_term:
                    self._entries[key] = (prev_term, e.type, e.data)

    def on_commit(self, node: NodeId, entries: tuple[Entry, ...], leader_term: int) -> None:
        """``node`` handed these committed entries to its state machine.

        ``leader_term`` is the node's term if it was the leader when it produced them, else 0.
        """
        for e in entries:
            content = (e.term, e.type, e.data)
            seen = self.committed.get(e.index)
            if seen is None:
                self.committed[e.index] = content
                if e.index > self.max_commit:
                    self.max_commit = e.index
            elif seen != content:
                self.fail(
                    f"state machine safety: {node} commits term {e.term} at {e.index}, "
                    f"others committed term {seen[0]}"
                )
                continue
            # The entry was committed by a leader of term <= leader_term; keep the smallest
            # such bound, so leaders of later terms must hold it.
            if leader_term and leader_term < self._commit_term.get(e.index, leader_term + 1):
                self._commit_term[e.index] = leader_term

    # -- state machines -------------------------------------------------------------------

    def on_apply(self, node: NodeId, prev_index: int, prev_digest: bytes, e: Entry) -> bytes:
        """Apply ``e`` on top of (prev_index, prev_digest); returns the new digest."""
        if e.index != prev_index + 1:
            self.fail(f"apply order: {node} applies {e.index} after {prev_index}")
        digest = chain(prev_digest, e)
        seen = self._digest.get(e.index)
        if seen is None:
            self._digest[e.index] = digest
        elif seen != digest:
            self.fail(f"state machine safety: {node} diverges at index {e.index}")
        return digest

    def on_install(self, node: NodeId, index: int, digest: bytes) -> None:
        seen = self._digest.get(index)
        if seen is not None and seen != digest:
            self.fail(f"snapshot safety: {node} installed a snapshot at {index} with a bad digest")

    # -- reads ----------------------------------------------------------------------------

    def on_read(self, node: NodeId, ctx: bytes, index: int, min_index: int) -> None:
        self.reads_checked += 1
        if index < min_index:
            self.fail(
                f"stale read: {node} got read index {index} for {ctx!r}, but {min_index} "
                "was already committed when the read was issued"
            )
