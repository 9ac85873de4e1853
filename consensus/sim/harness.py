"""A hand-driven cluster for readable scenario tests: nothing happens unless the test says so.

Each node is a ``RaftCore`` over a ``MemStore``. The test ticks nodes, makes them campaign or
propose, and delivers the queued messages explicitly (all of them, or only those a filter
accepts), with partitions and crashes as plain method calls. Everything a node applies is
recorded so tests can compare state machines. Every loop is bounded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from consensus.raft import RaftConfig, RaftCore
from consensus.readyloop import ReadyLoop
from consensus.sim.memstore import MemStore
from consensus.types import (
    Entry,
    EntryType,
    HardState,
    Message,
    NodeId,
    ReadState,
    Role,
    Snapshot,
)

MessageFilter = Callable[[Message], bool]


class Harness:
    """A set of cores, their durable stores and the messages in flight between them."""

    def __init__(
        self,
        ids: Iterable[NodeId],
        *,
        seed: int = 0,
        pre_vote: bool = True,
        check_quorum: bool = True,
        election_tick: int = 10,
        max_msg_entries: int = 512,
        max_inflight: int = 256,
        voters: tuple[NodeId, ...] | None = None,
    ) -> None:
        self.ids = list(ids)
        self.voters = tuple(self.ids) if voters is None else voters
        self.seed = seed
        self.opts = {
            "pre_vote": pre_vote,
            "check_quorum": check_quorum,
            "election_tick": election_tick,
            "max_msg_entries": max_msg_entries,
            "max_inflight": max_inflight,
        }
        self.stores: dict[NodeId, MemStore] = {}
        self.nodes: dict[NodeId, RaftCore] = {}
        self.applied: dict[NodeId, list[Entry]] = {}
        self.snapshots_applied: dict[NodeId, list[Snapshot]] = {}
        self.read_states: dict[NodeId, list[ReadState]] = {}
        self.queue: list[Message] = []
        self.down: set[NodeId] = set()
        #: directed links (frm, to) whose messages are dropped
        self.cut_links: set[tuple[NodeId, NodeId]] = set()
        self._restarts = 0
        for node in self.ids:
            self.add_node(node, peers=self.voters)

    # -- membership of the harness ------------------------------------------------------

    def add_node(self, node: NodeId, peers: tuple[NodeId, ...] = ()) -> RaftCore:
        """Create (or re-create from its store) a node; ``peers=()`` for a joining node."""
        store = self.stores.setdefault(node, MemStore())
        self.applied.setdefault(node, [])
        self.snapshots_applied.setdefault(node, [])
        self.read_states.setdefault(node, [])
        cfg = RaftConfig(
            id=node,
            peers=peers,
            election_tick=int(self.opts["election_tick"]),
            pre_vote=bool(self.opts["pre_vote"]),
            check_quorum=bool(self.opts["check_quorum"]),
            max_msg_entries=int(self.opts["max_msg_entries"]),
            max_inflight=int(self.opts["max_inflight"]),
        )
        rng = random.Random(f"{self.seed}/{node}/{self._restarts}")
        core = RaftCore(cfg, rng, store.load())
        self.nodes[node] = core
        if node not in self.ids:
            self.ids.append(node)
        return core

    def preset(
        self, node: NodeId, terms: list[int], term: int | None = None, vote: NodeId = ""
    ) -> RaftCore:
        """Give ``node`` a log whose entry ``i`` (1-based) has term ``terms[i-1]``, and restart it.

        Entries carry their position as data (``b"<index>/<term>"``): equal index and term
        means equal entry, as log matching requires, and tests can tell which one survived.
        Used to set up the divergent logs of the Raft paper's figures without replaying how
        they came about.
        """
        store = self.stores[node]
        store.entries = [
            Entry(t, i + 1, EntryType.NORMAL, b"%d/%d" % (i + 1, t)) for i, t in enumerate(terms)
        ]
        last_term = terms[-1] if terms else 0
        store.hard_state = HardState(term=max(term or 0, last_term), vote=vote, commit=0)
        self.queue = [m for m in self.queue if m.to != node and m.frm != node]
        self.applied[node] = []
        return self.add_node(node, peers=self.voters)

    def crash(self, node: NodeId) -> None:
        """Lose everything volatile; the durable store survives. Queued messages to it vanish."""
        self.down.add(node)
        self.queue = [m for m in self.queue if m.to != node and m.frm != node]

    def restart(self, node: NodeId) -> RaftCore:
        self._restarts += 1
        self.down.discard(node)
        self.applied[node] = []
        return self.add_node(node, peers=self.voters)

    # -- network ------------------------------------------------------------------------

    def isolate(self, node: NodeId) -> None:
        for other in self.ids:
            if other != node:
                self.cut_links.add((node, other))
                self.cut_links.add((other, node))

    def cut(self, a: NodeId, b: NodeId, one_way: bool = False) -> None:
        self.cut_links.add((a, b))
        if not one_way:
            self.cut_links.add((b, a))

    def heal(self) -> None:
        self.cut_links.clear()

    # -- driving ------------------------------------------------------------------------

    def process(self, node: NodeId) -> None:
        """Run the node's Ready loop: persist, queue messages, apply, advance (bounded)."""
        loop = ReadyLoop(self.nodes[node])  # synchronous: written, then queued, in one go
        store = self.stores[node]
        for _ in range(100):
            step = loop.next()
            if step is None:
                return
            rd = step.ready
            store.write(rd)
            if rd.snapshot is not None:
                self.snapshots_applied[node].append(rd.snapshot)
                self.applied[node] = [e for e in self.applied[node] if e.index <= 0]
            self.queue.extend(rd.messages)
            self.applied[node].extend(rd.committed_entries)
            self.read_states[node].extend(rd.read_states)
            loop.advance(step)
        raise AssertionError(f"{node} kept producing Readys")

    def process_all(self) -> None:
        for node in self.ids:
            if node not in self.down:
                self.process(node)

    def tick(self, node: NodeId, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[node].tick()
        self.process(node)

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for node in self.ids:
                if node not in self.down:
                    self.nodes[node].tick()
            self.process_all()

    def campaign(self, node: NodeId) -> None:
        self.nodes[node].campaign()
        self.process(node)

    def propose(self, node: NodeId, data: bytes) -> tuple[int, int]:
        result = self.nodes[node].propose(data)
        self.process(node)
        return result

    def take(self, accept: MessageFilter | None = None) -> list[Message]:
        """Remove and return the queued messages ``accept`` selects (all by default)."""
        taken = [m for m in self.queue if accept is None or accept(m)]
        self.queue = [m for m in self.queue if not (accept is None or accept(m))]
        return taken

    def deliver(self, msgs: Iterable[Message]) -> None:
        """Step the given messages into their recipients (dropping cut or dead links)."""
        for m in msgs:
            if m.to in self.down or m.frm in self.down or (m.frm, m.to) in self.cut_links:
                continue
            core = self.nodes.get(m.to)
            if core is None:
                continue
            core.step(m)
            self.process(m.to)

    def stabilize(self, max_rounds: int = 200, accept: MessageFilter | None = None) -> int:
        """Deliver queued messages until none are left; returns the number of rounds."""
        for rounds in range(max_rounds):
            self.process_all()
            batch = self.take(accept)
            if not batch:
                return rounds
            self.deliver(batch)
        raise AssertionError("network did not quiesce")

    def elect(self, node: NodeId) -> None:
        """Make ``node`` campaign and deliver everything until the cluster is quiet."""
        self.campaign(node)
        self.stabilize()
        assert self.nodes[node].role == Role.LEADER, f"{node} failed to become leader"

    # -- inspection ---------------------------------------------------------------------

    def leaders(self) -> list[NodeId]:
        return [n for n in self.ids if n not in self.down and self.nodes[n].role == Role.LEADER]

    def data_applied(self, node: NodeId) -> list[bytes]:
        """The NORMAL payloads ``node`` applied (what a state machine would see)."""
        return [e.data for e in self.applied[node] if e.type == EntryType.NORMAL]

    def log_terms(self, node: NodeId) -> list[tuple[int, int]]:
        log = self.nodes[node].log
        return [(e.index, e.term) for e in log.entries]
