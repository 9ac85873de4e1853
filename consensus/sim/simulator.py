"""The deterministic cluster simulator: Raft cores over a simulated network and a virtual clock.

One ``random.Random(seed)`` drives the network and the chaos schedule; each core gets its own
RNG derived from the seed, its id and its incarnation, so the same seed replays the same run
event for event (the trace hash proves it).

A run has two phases. During **chaos** the schedule injects partitions (symmetric and one-way),
crashes and restarts, lossy/duplicating/reordering links, membership changes, leadership
transfers and log compaction, while clients propose entries and request linearizable reads.
Then everything **heals** (links repaired, crashed nodes restarted) and the cluster must elect a
leader and commit a fresh proposal within ``liveness_s`` of virtual time.

Persistence is modelled the way the driver does it: a ``Ready`` that needs an fsync is "in
flight" for a short virtual time; its messages leave only when the write completes. A crash
during that window keeps a random prefix of the Ready's records (a torn tail of entries that
were never acknowledged), which is exactly what the storage layer may recover.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consensus.confchange import decode_conf_change
from consensus.raft import ConfChangeRejected, RaftConfig, RaftCore
from consensus.readyloop import ReadyLoop, SendAt, Step
from consensus.sim.appstate import GENESIS, decode_snapshot, encode_snapshot
from consensus.sim.checker import Checker
from consensus.sim.memstore import MemStore
from consensus.sim.network import LinkModel, Network
from consensus.sim.trace import Trace
from consensus.types import (
    ConfChange,
    ConfChangeType,
    EntryType,
    Message,
    NodeId,
    NotLeader,
    Role,
    Snapshot,
)

LIVE_MARKER = b"live:"


@dataclass(frozen=True)
class SimConfig:
    """Shape of one simulated run (all times are virtual)."""

    nodes: int = 5
    chaos_s: float = 20.0
    #: after healing, a leader must commit a new proposal within this bound
    liveness_s: float = 30.0
    tick_us: int = 100_000
    election_tick: int = 10
    #: ``None`` lets each seed pick (mostly on), so the variants without them get tested too
    pre_vote: bool | None = None
    check_quorum: bool | None = None
    propose_every_us: int = 50_000
    read_every_us: int = 400_000
    fault_every_us: int = 1_000_000
    faults: bool = True
    membership: bool = True
    compaction: bool = True
    torn_writes: bool = True
    fsync_min_us: int = 100
    fsync_max_us: int = 3_000
    max_extra_nodes: int = 3
    min_voters: int = 3
    trace_keep: int = 200


@dataclass
class SimResult:
    seed: int
    violations: list[str]
    trace_tail: list[str]
    trace_hash: str
    sim_seconds: float
    events: int
    committed: int
    elections: int
    reads_checked: int
    recovery_s: float | None = None
    nodes_created: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        """A human-readable failure report: the seed, what broke, and the last events."""
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s)"]
        lines += [f"  ! {v}" for v in self.violations]
        lines.append(f"last {len(self.trace_tail)} events (trace hash {self.trace_hash}):")
        lines += [f"  {t}" for t in self.trace_tail]
        lines.append(f"replay: python -m consensus.sim --start {self.seed} --seeds 1 --verbose")
        return "\n".join(lines)


class SimNode:
    """A simulated machine: a core, its durable store, its state machine and its Ready loop."""

    __slots__ = (
        "alive",
        "app_digest",
        "app_index",
        "core",
        "crash_mid_write",
        "id",
        "incarnation",
        "inflight_leader_term",
        "leader_term_seen",
        "loop",
        "peers",
        "retired",
        "store",
    )

    def __init__(
        self, node_id: NodeId, peers: tuple[NodeId, ...], core: RaftCore, pipeline: bool
    ) -> None:
        self.id = node_id
        self.peers = peers
        self.core = core
        #: The Ready loop every driver shares (``consensus.readyloop``); its Ready in flight
        #: is the one waiting for its simulated fsync.
        self.loop = ReadyLoop(core, pipeline=pipeline)
        self.store = MemStore()
        self.alive = True
        self.retired = False
        self.incarnation = 0
        self.inflight_leader_term = 0
        #: when non-zero: crash during the next durable write, then stay down this long (µs)
        self.crash_mid_write = 0
        self.leader_term_seen = 0
        self.app_index = 0
        self.app_digest = GENESIS


class Simulation:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.cfg = config or SimConfig()
        self.rng = random.Random(seed)
        self.now = 0
        self._seq = 0
        self._queue: list[tuple[int, int, Callable[[Any], None], Any]] = []
        self.net = Network(self.rng)
        self.checker = Checker()
        self.trace = Trace(self.cfg.trace_keep)
        self.nodes: dict[NodeId, SimNode] = {}
        self._initial = tuple(f"n{i + 1}" for i in range(self.cfg.nodes))
        self._created = len(self._initial)
        # Vary the replication knobs per seed so batching and pipelining edge cases get hit.
        self._max_msg_entries = self.rng.choice((1, 4, 64, 512))
        self._max_inflight = self.rng.choice((1, 4, 256))
        pv, cq = self.cfg.pre_vote, self.cfg.check_quorum
        self._pre_vote = pv if pv is not None else self.rng.random() < 0.75
        self._check_quorum = cq if cq is not None else self.rng.random() < 0.75
        # Like the asyncio driver (and etcd), a steady leader may send its messages before its
        # own write is durable; half the seeds model that, half the strict persist-then-send.
        self._leader_sends_early = self.rng.random() < 0.5
        self._client_hint: NodeId = ""
        self._proposals = 0
        self._reads = 0
        self._read_floor: dict[bytes, int] = {}
        self._healed_at: int | None = None
        self._recovered_at: int | None = None
        self._live_attempt: tuple[NodeId, int] | None = None
        self._retiring: set[NodeId] = set()
        self._elections = 0
        self._done = False

    # ------------------------------------------------------------------ scheduling

    def _at(self, when: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, fn, arg))

    def _log(self, line: str) -> None:
        self.trace.add(f"{self.now / 1e6:10.6f} {line}")

    # ------------------------------------------------------------------ nodes

    def _make_core(
        self, node: SimNode | None, node_id: NodeId, peers: tuple[NodeId, ...], incarnation: int
    ) -> RaftCore:
        cfg = RaftConfig(
            id=node_id,
            peers=peers,
            election_tick=self.cfg.election_tick,
            pre_vote=self._pre_vote,
            check_quorum=self._check_quorum,
            max_msg_entries=self._max_msg_entries,
            max_inflight=self._max_inflight,
        )
        rng = random.Random(f"{self.seed}/{node_id}/{incarnation}")
        state = node.store.load() if node is not None else None
        return RaftCore(cfg, rng, state)

    def _add_node(self, node_id: NodeId, peers: tuple[NodeId, ...]) -> SimNode:
        node = SimNode(
            node_id, peers, self._make_core(None, node_id, peers, 0), self._leader_sends_early
        )
        self.nodes[node_id] = node
        self._at(self.now + self.rng.randint(1, self.cfg.tick_us), self._tick, (node, 0))
        return node

    def _tick(self, arg: tuple[SimNode, int]) -> None:
        node, inc = arg
        if not node.alive or node.incarnation != inc:
            return
        node.core.tick()
        self._after_input(node)
        self._at(self.now + self.cfg.tick_us, self._tick, arg)

    def _after_input(self, node: SimNode) -> None:
        core = node.core
        if core.role == Role.LEADER and core.term != node.leader_term_seen:
            node.leader_term_seen = core.term
            self._elections += 1
            self._log(f"{node.id} becomes leader of term {core.term}")
            self.checker.on_leader(node.id, core.term, core.log)
        self._pump(node)

    def _pump(self, node: SimNode) -> None:
        core = node.core
        for _ in range(64):
            step = node.loop.next()
            if step is None:
                return
            rd = step.ready
            is_leader = core.role == Role.LEADER
            leader_term = core.term if is_leader else 0
            if rd.entries:
                self.checker.on_persist(node.id, rd.entries, core.log)
            if step.send_at is SendAt.BEFORE_WRITE:
                for m in rd.messages:
                    self._send(m)
                step.sent = True
            if rd.must_sync:
                node.inflight_leader_term = leader_term
                delay = self.rng.randint(self.cfg.fsync_min_us, self.cfg.fsync_max_us)
                self._at(self.now + delay, self._fsync_done, (node, node.incarnation))
                if node.crash_mid_write:
                    downtime, node.crash_mid_write = node.crash_mid_write, 0
                    when = self.now + self.rng.randint(0, delay - 1)
                    self._at(when, self._crash_for, (node, node.incarnation, downtime))
                return
            self._complete(node, step, leader_term)

    def _fsync_done(self, arg: tuple[SimNode, int]) -> None:
        node, inc = arg
        step = node.loop.inflight
        if not node.alive or node.incarnation != inc or step is None:
            return
        self._complete(node, step, node.inflight_leader_term)
        self._pump(node)

    def _complete(self, node: SimNode, step: Step, leader_term: int) -> None:
        """Persist, send (unless already sent), apply and acknowledge one Ready."""
        rd = step.ready
        node.store.write(rd)
        if not step.sent:
            for m in rd.messages:
                self._send(m)
            step.sent = True
        checker = self.checker
        if rd.snapshot is not None:
            index, digest = decode_snapshot(rd.snapshot.data)
            checker.on_install(node.id, index, digest)
            node.app_index, node.app_digest = index, digest
            self._log(f"{node.id} installs snapshot at {index}")
        if rd.committed_entries:
            for e in rd.committed_entries:
                node.app_digest = checker.on_apply(node.id, node.app_index, node.app_digest, e)
                node.app_index = e.index
                if e.type == EntryType.CONF_CHANGE:
                    self._on_conf_committed(e.data)
                elif (
                    self._healed_at is not None
                    and self._recovered_at is None
                    and e.data.startswith(LIVE_MARKER)
                ):
                    self._recovered_at = self.now
                    self._log(f"{node.id} commits liveness probe at {e.index}")
                    self._done = True
            checker.on_commit(node.id, rd.committed_entries, leader_term)
        for rs in rd.read_states:
            floor = self._read_floor.pop(rs.request_ctx, None)
            if floor is not None:
                checker.on_read(node.id, rs.request_ctx, rs.index, floor)
        node.loop.advance(step)

    def _send(self, m: Message) -> None:
        for delay in self.net.deliveries(m.frm, m.to):
            self._at(self.now + delay, self._deliver, m)

    def _deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        if node is None or not node.alive or not self.net.can_deliver(m.frm, m.to):
            return
        self._log(
            f"{m.frm}->{m.to} {m.type.name} t{m.term} i{m.index} lt{m.log_term} "
            f"n{len(m.entries)} c{m.commit}{' rej' if m.reject else ''}"
            f"{f' h{m.reject_hint}' if m.reject else ''}"
        )
        node.core.step(m)
        self._after_input(node)

    # ------------------------------------------------------------------ crashes

    def _crash(self, node: SimNode) -> None:
        if not node.alive:
            return
        kept = "-"
        inflight = node.loop.inflight
        if inflight is not None and self.cfg.torn_writes:
            total = MemStore.record_count(inflight.ready)
            keep = self.rng.randint(0, total)
            node.store.write(inflight.ready, keep=keep)
            kept = f"{keep}/{total}"
        node.alive = False
        node.loop.drop()
        node.crash_mid_write = 0
        node.incarnation += 1
        self._log(f"{node.id} crashes (unsynced records kept: {kept})")

    def _crash_for(self, arg: tuple[SimNode, int, int]) -> None:
        """Crash now (if still the same incarnation) and restart after ``downtime`` µs."""
        node, inc, downtime = arg
        if not node.alive or node.incarnation != inc:
            return
        self._crash(node)
        self._at(self.now + downtime, self._restart, node)

    def _restart(self, node: SimNode) -> None:
        if node.alive or node.retired:
            return
        node.incarnation += 1
        node.core = self._make_core(node, node.id, node.peers, node.incarnation)
        node.loop = ReadyLoop(node.core, pipeline=self._leader_sends_early)
        node.alive = True
        node.leader_term_seen = 0
        snap = node.store.snapshot
        node.app_index, node.app_digest = (
            decode_snapshot(snap.data) if not snap.is_empty else (0, GENESIS)
        )
        self._log(
            f"{node.id} restarts: term {node.core.term} vote {node.core.vote or '-'} "
            f"last {node.core.log.last_index} commit {node.core.log.commit}"
        )
        self._at(
            self.now + self.rng.randint(1, self.cfg.tick_us), self._tick, (node, node.incarnation)
        )
        self._after_input(node)

    def _retire(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        if node.alive:
            self._crash(node)
        node.retired = True
        self._log(f"{node_id} retired (removed from the cluster)")

    def _on_conf_committed(self, data: bytes) -> None:
        decoded = decode_conf_change(data)
        if decoded is None:
            return
        cc, _ = decoded
        if cc.type == ConfChangeType.REMOVE_NODE and cc.node not in self._retiring:
            self._retiring.add(cc.node)
            self._at(self.now + 1_000_000, self._retire, cc.node)

    # ------------------------------------------------------------------ clients

    def _alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and not n.retired]

    def _leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self._alive():
            if n.core.role == Role.LEADER and (best is None or n.core.term > best.core.term):
                best = n
        return best

    def _client_propose(self, _: object) -> None:
        alive = self._alive()
        if alive:
            target = self.nodes.get(self._client_hint)
            if target is None or not target.alive or target.retired:
                target = self.rng.choice(alive)
            self._proposals += 1
            data = b"c%d" % self._proposals
            try:
                term, index = target.core.propose(data)
                self._log(f"client proposes {data!r} at {target.id}: ({term}, {index})")
            except NotLeader as exc:
                self._client_hint = exc.leader
            self._after_input(target)
        self._at(self.now + self.cfg.propose_every_us, self._client_propose)

    def _client_read(self, _: object) -> None:
        alive = self._alive()
        if alive:
            node = self.rng.choice(alive)
            self._reads += 1
            ctx = b"read%d" % self._reads
            self._read_floor[ctx] = self.checker.max_commit
            node.core.read_index(ctx)
            self._after_input(node)
        self._at(self.now + self.cfg.read_every_us, self._client_read)

    # ------------------------------------------------------------------ chaos

    def _chaos(self, _: object) -> None:
        if self._healed_at is not None:
            return
        rng = self.rng
        actions: list[tuple[int, Callable[[], None]]] = [
            (3, self._fault_partition),
            (2, self._fault_isolate),
            (2, self._fault_bridge),
            (1, self._fault_one_way),
            (3, self._fault_heal),
            (4, self._fault_crash),
            (2, self._fault_links),
            (1, self._fault_transfer),
        ]
        if self.cfg.membership:
            actions.append((2, self._fault_membership))
        if self.cfg.compaction:
            actions.append((2, self._fault_compact))
        total = sum(w for w, _ in actions)
        pick = rng.randrange(total)
        for weight, action in actions:
            if pick < weight:
                action()
                break
            pick -= weight
        mean = self.cfg.fault_every_us
        self._at(self.now + rng.randint(mean // 2, mean * 3 // 2), self._chaos)

    def _member_ids(self) -> list[NodeId]:
        return [n.id for n in self.nodes.values() if not n.retired]

    def _fault_partition(self) -> None:
        ids = self._member_ids()
        self.rng.shuffle(ids)
        cut = self.rng.randint(1, max(1, len(ids) - 1))
        self.net.heal()
        self.net.partition([ids[:cut], ids[cut:]])
        self._log(f"partition {sorted(ids[:cut])} | {sorted(ids[cut:])}")

    def _fault_bridge(self) -> None:
        """Two sides that cannot talk to each other but both reach one bridge node."""
        ids = self._member_ids()
        if len(ids) < 3:
            return
        self.rng.shuffle(ids)
        bridge, rest = ids[0], ids[1:]
        cut = self.rng.randint(1, len(rest) - 1)
        self.net.heal()
        self.net.partition([rest[:cut], rest[cut:]])
        self._log(f"bridge partition {sorted(rest[:cut])} | {sorted(rest[cut:])} via {bridge}")

    def _fault_isolate(self) -> None:
        leader = self._leader()
        ids = self._member_ids()
        victim = (
            leader.id if leader is not None and self.rng.random() < 0.5 else self.rng.choice(ids)
        )
        self.net.partition([[victim], [i for i in ids if i != victim]])
        self._log(f"isolate {victim}")

    def _fault_one_way(self) -> None:
        ids = self._member_ids()
        links = []
        for _ in range(self.rng.randint(1, 3)):
            a, b = self.rng.sample(ids, 2)
            self.net.cut(a, b)
            links.append(f"{a}->{b}")
        self._log(f"one-way cuts {', '.join(links)}")

    def _fault_heal(self) -> None:
        self.net.heal()
        self._log("network healed")

    def _fault_crash(self) -> None:
        alive = self._alive()
        if len(alive) <= 1:
            return
        down = sum(1 for n in self.nodes.values() if not n.alive and not n.retired)
        if down >= (len(alive) + down) // 2:
            return
        leader = self._leader()
        candidates = [n for n in alive if n.core.role in (Role.CANDIDATE, Role.PRE_CANDIDATE)]
        roll = self.rng.random()
        if leader is not None and roll < 0.35:
            victim = leader
        elif candidates and roll < 0.6:
            victim = self.rng.choice(candidates)  # crash in the middle of an election
        else:
            victim = self.rng.choice(alive)
        # Quick bounces hit the windows where durable state matters most (a vote cast just
        # before the crash, entries acknowledged just before it); long outages make laggards.
        if self.rng.random() < 0.4:
            downtime = self.rng.randint(1_000, 100_000)
        else:
            downtime = self.rng.randint(100_000, 5_000_000)
        if self.cfg.torn_writes and self.rng.random() < 0.5:
            # Crash in the middle of the victim's next write: a torn tail of unsynced records.
            victim.crash_mid_write = downtime
            return
        self._crash(victim)
        self._at(self.now + downtime, self._restart, victim)

    def _fault_links(self) -> None:
        rng = self.rng
        self.net.model = LinkModel(
            min_delay_us=rng.choice((100, 500, 2_000)),
            max_delay_us=rng.choice((5_000, 20_000, 150_000)),
            drop=rng.choice((0.0, 0.02, 0.1, 0.3)),
            duplicate=rng.choice((0.0, 0.02, 0.1)),
            reorder=rng.choice((0.0, 0.05, 0.2)),
        )
        m = self.net.model
        self._log(
            f"links: delay {m.min_delay_us}-{m.max_delay_us}us drop {m.drop} "
            f"dup {m.duplicate} reorder {m.reorder}"
        )

    def _fault_transfer(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        others = [v for v in leader.core.conf.voters if v != leader.id]
        if others:
            to = self.rng.choice(others)
            self._log(f"transfer leadership {leader.id} -> {to}")
            leader.core.transfer_leadership(to)
            self._after_input(leader)

    def _fault_compact(self) -> None:
        candidates = [n for n in self._alive() if n.loop.inflight is None]
        if not candidates:
            return
        node = self.rng.choice(candidates)
        core = node.core
        if node.app_index - core.log.snapshot_index < 5 or node.app_index != core.log.applied:
            return
        snap = Snapshot(
            core.snapshot_meta(node.app_index), encode_snapshot(node.app_index, node.app_digest)
        )
        node.store.compact(snap)
        core.compact(snap)
        self._log(f"{node.id} compacts its log at {node.app_index}")

    def _fault_membership(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        conf = leader.core.conf
        rng = self.rng
        can_add = self._created < self.cfg.nodes + self.cfg.max_extra_nodes
        roll = rng.random()
        new_id = ""
        if conf.learners and roll < 0.4:
            cc = ConfChange(ConfChangeType.ADD_NODE, rng.choice(conf.learners))
        elif len(conf.voters) > self.cfg.min_voters and (roll < 0.7 or not can_add):
            cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(conf.voters))
        elif can_add:
            new_id = f"n{self._created + 1}"
            kind = ConfChangeType.ADD_LEARNER if rng.random() < 0.3 else ConfChangeType.ADD_NODE
            cc = ConfChange(kind, new_id)
        else:
            return
        try:
            term, index = leader.core.propose_conf_change(cc)
        except (ConfChangeRejected, NotLeader) as exc:
            self._log(f"conf change {cc.type.name} {cc.node} refused: {exc}")
            return
        self._log(f"conf change {cc.type.name} {cc.node} proposed at ({term}, {index})")
        if new_id:
            self._created += 1
            self._add_node(new_id, ())
        self._after_input(leader)

    # ------------------------------------------------------------------ heal and liveness

    def _heal_all(self, _: object) -> None:
        self._healed_at = self.now
        self.net.heal()
        self.net.model = LinkModel()
        self._log("chaos over: network repaired, restarting crashed nodes")
        for node in list(self.nodes.values()):
            if not node.alive and not node.retired:
                self._restart(node)
        self._at(self.now, self._liveness_probe)
        deadline = self.now + int(self.cfg.liveness_s * 1e6)
        self._at(deadline, self._liveness_deadline)

    def _liveness_probe(self, _: object) -> None:
        if self._recovered_at is not None:
            return
        leader = self._leader()
        if leader is not None:
            key = (leader.id, leader.core.term)
            if key != self._live_attempt:
                try:
                    term, index = leader.core.propose(LIVE_MARKER + b"%d" % self.now)
                    self._live_attempt = key
                    self._log(f"liveness probe proposed at {leader.id}: ({term}, {index})")
                except NotLeader:
                    pass
                self._after_input(leader)
        self._at(self.now + 100_000, self._liveness_probe)

    def _liveness_deadline(self, _: object) -> None:
        if self._recovered_at is not None:
            return
        states = ", ".join(
            f"{n.id}:{n.core.role.name.lower()}/t{n.core.term}/c{n.core.log.commit}"
            f"/l{n.core.log.last_index}"
            for n in self._alive()
        )
        self.checker.fail(
            f"liveness: nothing committed within {self.cfg.liveness_s}s after healing [{states}]"
        )
        self._done = True

    # ------------------------------------------------------------------ run

    def run(self) -> SimResult:
        for node_id in self._initial:
            self._add_node(node_id, self._initial)
        self._at(self.cfg.propose_every_us, self._client_propose)
        self._at(self.cfg.read_every_us, self._client_read)
        chaos_end = int(self.cfg.chaos_s * 1e6)
        if self.cfg.faults:
            self._at(self.rng.randint(0, self.cfg.fault_every_us), self._chaos)
        self._at(chaos_end, self._heal_all)
        queue = self._queue
        checker = self.checker
        events = 0
        while queue and not self._done:
            when, _, fn, arg = heapq.heappop(queue)
            self.now = when
            fn(arg)
            events += 1
            if checker.violations:
                break
        recovery = None
        if self._recovered_at is not None and self._healed_at is not None:
            recovery = (self._recovered_at - self._healed_at) / 1e6
        return SimResult(
            seed=self.seed,
            violations=list(checker.violations),
            trace_tail=list(self.trace.tail),
            trace_hash=self.trace.digest,
            sim_seconds=self.now / 1e6,
            events=events,
            committed=checker.max_commit,
            elections=self._elections,
            reads_checked=checker.reads_checked,
            recovery_s=recovery,
            nodes_created=self._created,
        )


def run_seed(seed: int, config: SimConfig | None = None) -> SimResult:
    """Run one seed to completion."""
    return Simulation(seed, config).run()


__all__ = ["SimConfig", "SimResult", "Simulation", "run_seed"]
