"""The asyncio driver: runs one ``RaftCore`` against a durable log, a transport and a state machine.

Everything that reaches the core (inbound messages, ticks, proposals, reads) is first queued;
the core is only ever run by one pass of ``_pump`` at a time, so it is never stepped between
``ready()`` and ``advance()`` and needs no locks. A pass:

1. feeds queued messages, ticks, proposals and reads to the core;
2. takes a ``Ready`` (through ``consensus.readyloop``, the Ready loop the simulator and the
   test harness share, which also decides when its messages may leave) and persists it: one
   write and one fsync for every proposal and message fed in step 1 (group commit). On a slow
   disk the fsync runs in a worker thread so the event
   loop keeps receiving meanwhile; the Ready is "parked" and the loop task awaits the thread.
   On a fast disk (recent fsyncs under ``INLINE_FSYNC_S``) it runs inline: the hand-off to the
   thread and back (a submit, a wake-up, a self-pipe write, an extra loop turn) costs more
   than the fsync itself, on the latency path of every commit and in CPU under load;
3. sends its messages, applies its committed entries, resolves futures, serves reads, and
   calls ``advance``.

Inputs that arrive while step 2 waits for the disk are all fed in the next pass, so batches
grow with load and the fsync rate stays bounded. Passes normally run in the loop task; when it
is idle, a batch of inbound messages runs a pass directly from the transport's callback, which
saves an event-loop turn per network hop on the commit path. A hard state that differs from
the durable one only in its commit index is written without an fsync (etcd's ``MustSync``).

On a deferred disk (``consensus.disk``: the KM enclave's files, which its host holds) step 2
queues the writes and their fsync, in order, and the loop task awaits the disk's word that they
are done (the host's "persisted up to") before step 3: the same rule, with the fsync elsewhere.

Snapshots are taken in the background: the state machine's image is captured between two
applies (``snapshot_capture``, when the state machine has it: cheap, consistent), serialised and
written to its own file by a worker thread while the node keeps committing and applying, and
only the log compaction itself (dropping covered segments, and the core's in-memory log) runs
on the loop, at a point where no persist is in flight. A snapshot is due every
``snapshot_every`` applied entries, but not before the log written since the last snapshot is
at least as large as that snapshot: the state (every release ever made) keeps growing, and a
fixed interval would make the cost of snapshots per entry grow with it.

Leader pipelining (Raft dissertation §10.2.1): a node that was leader before and after a
``Ready`` sends that Ready's messages *before* its own fsync, and has the transport flush them
to the wire, so followers write in parallel with it. This is safe because a leader's term and
vote were made durable when it campaigned, and the core counts the leader's own log toward
commit only up to what ``advance`` reports durable. Every other node persists first and sends
after, as ``Ready`` documents.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from consensus.deadlines import Deadlines
from consensus.raft import RaftConfig, RaftCore, Status
from consensus.readyloop import ReadyLoop, SendAt, Step
from consensus.statemachine import StateMachine
from consensus.storage import DurableLog
from consensus.ticker import Ticker
from consensus.transport import Transport
from consensus.types import (
    ConfChange,
    Entry,
    EntryType,
    Message,
    NodeId,
    ProposalDropped,
    ProposalTimeout,
    RaftError,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)

log = logging.getLogger(__name__)

#: Tick every 25 ms: with ``election_tick=10`` elections time out after 0.25-0.5 s of silence,
#: which keeps fail-over under half a second while heartbeats (every tick) still leave a wide
#: margin over loopback latency and fsync stalls.
DEFAULT_TICK_INTERVAL = 0.025
#: Most ticks from ``tick`` that wait for one pass of the core (see ``tick``).
MAX_FED_TICKS = 2
#: Persist inline while the recent fsync time (a moving average) is below this; a thread above.
#: 0.1-0.2 ms is a good SSD or a VM's virtual disk on a good day, where the thread hand-off costs
#: as much again; 1-4 ms (the same VM's disk on a bad day) would stall the loop for that long.
INLINE_FSYNC_S = 0.0005


class DriverStopped(RaftError):
    """The driver stopped before the request completed; its outcome is unknown."""


@dataclass
class DriverStats:
    readies: int = 0
    fsync_batches: int = 0
    entries_persisted: int = 0
    applied: int = 0
    inbox_dropped: int = 0
    #: Times this node saw the leader change (to another node, or to none).
    leader_changes: int = 0
    #: Proposals that did not apply here (not the leader, dropped, timed out, stopped).
    proposals_failed: int = 0


_Proposal = tuple[bytes | ConfChange, "asyncio.Future[object]"]


class RaftDriver:
    """Drives one Raft node. Construct, ``await start()``, use, ``await stop()``.

    ``log`` is an opened ``DurableLog``; the core is rebuilt from its ``initial_state`` and the
    state machine restored from its snapshot. The driver owns the log and the transport from
    ``start`` on and closes both in ``stop``. ``snapshot_every`` applied entries, the state
    machine is snapshotted and the log compacted (0 disables it), in the background; see the
    module docstring. A state machine may offer ``snapshot_capture() -> () -> bytes`` (an image
    taken now, serialised later in a thread); otherwise ``snapshot()`` runs on the loop and only
    the writing happens in the thread. ``persist_in_thread``: None (default) persists in a
    thread when the log fsyncs, unless recent fsyncs were fast (``INLINE_FSYNC_S``); True
    always in the thread; False always inline. ``on_append`` sees entries as they are written
    to the log, before they are durable, if they are not yet known to be committed: hints for
    work worth starting early (they may still be replaced), never a reason to act on them.
    """

    def __init__(
        self,
        config: RaftConfig,
        log: DurableLog,
        transport: Transport,
        state_machine: StateMachine,
        *,
        tick_interval: float = DEFAULT_TICK_INTERVAL,
        rng: random.Random | None = None,
        snapshot_every: int = 10_000,
        max_inbox: int = 100_000,
        persist_in_thread: bool | None = None,
        on_append: Callable[[tuple[Entry, ...]], None] | None = None,
        fed_ticks: bool = False,
        ordered_io: bool = False,
    ) -> None:
        state = log.initial_state
        snap = state.snapshot
        if not snap.is_empty:
            state_machine.restore(snap.data)
        # The state machine is in memory: after a restart it holds exactly the snapshot, so the
        # core must hand out every committed entry after it again.
        self.config = replace(config, applied=snap.meta.index)
        self.core = RaftCore(self.config, rng or random.Random(), state)
        self.id: NodeId = config.id
        self.log = log
        self.transport = transport
        self.sm = state_machine
        self.tick_interval = tick_interval
        self.snapshot_every = snapshot_every
        self.max_inbox = max_inbox
        self.stats = DriverStats()
        self._seen_lead: NodeId = ""
        self.applied_index = snap.meta.index
        self._last_snapshot = snap.meta.index
        #: Log bytes written when the last snapshot was taken, and that snapshot's size.
        self._snapshot_log_bytes = log.bytes_written
        self._snapshot_size = len(snap.data)
        self._snapshot_task: asyncio.Task[None] | None = None
        self._snapshot_written: Snapshot | None = None
        self._snapshot_executor: ThreadPoolExecutor | None = None
        self._inbox: deque[Message] = deque()
        self._proposals: deque[_Proposal] = deque()
        self._reads: deque[tuple[bytes, asyncio.Future[int]]] = deque()
        self._ticks = 0
        self._pending: dict[int, tuple[int, asyncio.Future[object]]] = {}
        self._pending_min_term = 0
        self._read_waits: dict[bytes, asyncio.Future[int]] = {}
        self._read_ready: list[tuple[int, asyncio.Future[int]]] = []
        self._read_ids = itertools.count(1)
        #: Timeouts of proposals and reads (one timer for all: see ``consensus.deadlines``).
        self._deadlines = Deadlines()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker = Ticker(tick_interval, self._on_tick)
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._closed = False
        self._idle = False
        self._persist_started = 0.0
        self._durable_wait: Awaitable[None] | None = None
        #: A host's disk (``consensus.disk``): writes are queued, the loop awaits ``durable``.
        self._deferred = log.disk.deferred
        self._persist_in_thread = (
            False
            if self._deferred
            else log.fsync
            if persist_in_thread is None
            else persist_in_thread
        )
        self._on_append = on_append
        #: Ticks come from ``tick`` (a host's timer: an enclave has no clock of its own).
        self.fed_ticks = fed_ticks
        #: The deferred disk and the transport share one ordered channel to an I/O host that
        #: does each write before any send queued after it (a KM enclave's host holding both
        #: its files and its sockets): a Ready's messages may leave right behind its writes.
        self._ready_loop = ReadyLoop(self.core, ordered_io=ordered_io and self._deferred)
        #: Moving average of the time a synced persist took; starts pessimistic (the thread),
        #: and persists in the thread keep measuring, so a disk that speeds up is noticed.
        self.fsync_avg_s = 0.01
        self._inline_fsync = persist_in_thread is None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        if self._persist_in_thread:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"raft-log-{self.id}")
        await self.transport.start(self._on_messages)
        if not self.fed_ticks:
            self._ticker.start()
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.id}")

    async def stop(self) -> None:
        """Stop ticking and processing, fail outstanding requests, close transport and log.

        Any persist already running completes first, so the log is never closed under a write.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._ticker.stop()
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._snapshot_task is not None:
            # A snapshot file being written finishes before the log closes (the compaction it
            # would lead to is skipped: the next start replays from whatever is durable).
            await asyncio.wait({self._snapshot_task}, timeout=30.0)
        loop = asyncio.get_running_loop()
        for executor in (self._executor, self._snapshot_executor):
            if executor is not None:
                await loop.run_in_executor(None, executor.shutdown)
        await self.transport.stop()
        self.log.close()
        self._fail_all(DriverStopped(f"raft driver {self.id} stopped"))
        self._deadlines.close()

    def _fail_all(self, err: Exception) -> None:
        """Fail every queued or in-flight request with ``err``."""
        futures: list[asyncio.Future[object]] = [f for _, f in self._proposals]
        futures += [f for _, f in self._pending.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)
        reads = [f for _, f in self._reads] + list(self._read_waits.values())
        reads += [f for _, f in self._read_ready]
        for rfut in reads:
            if not rfut.done():
                rfut.set_exception(err)
        self._proposals.clear()
        self._pending.clear()
        self._reads.clear()
        self._read_waits.clear()
        self._read_ready.clear()

    # -- public requests -----------------------------------------------------------------------

    async def propose(self, data: bytes, timeout: float = 5.0) -> object:
        """Replicate ``data``; returns the state machine's ``apply`` result once applied here.

        Raises ``NotLeader`` (with the leader hint), ``ProposalDropped`` (a later leader
        replaced the entry) or ``ProposalTimeout`` (unknown outcome: it may still commit).
        """
        return await self._submit(data, timeout)

    async def propose_conf_change(self, cc: ConfChange, timeout: float = 5.0) -> None:
        """Replicate a membership change; returns once it is committed and applied here."""
        await self._submit(cc, timeout)

    async def read_index(self, timeout: float = 5.0) -> int:
        """Linearizable read barrier: returns once this node's state machine reflects every
        write committed before the call; read the state machine right after."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ctx = next(self._read_ids).to_bytes(8, "big")
        self._check_running()
        self._reads.append((ctx, fut))
        self._deadlines.watch(
            fut, timeout, lambda: ProposalTimeout(f"read index not confirmed within {timeout}s")
        )
        self._kick()
        try:
            return await fut
        except ProposalTimeout:
            self._read_waits.pop(ctx, None)
            raise

    def campaign(self) -> None:
        """Start an election now (tests, operator tooling)."""
        self.core.campaign()
        self._kick()

    def transfer_leadership(self, to: NodeId) -> None:
        self.core.transfer_leadership(to)
        self._kick()

    @property
    def status(self) -> Status:
        return self.core.status

    @property
    def is_leader(self) -> bool:
        return self.core.role == Role.LEADER

    @property
    def leader(self) -> NodeId:
        return self.core.lead

    # -- internals -----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopping or self._task is None:
            raise DriverStopped(f"raft driver {self.id} is not running")

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _submit(self, item: bytes | ConfChange, timeout: float) -> object:
        self._check_running()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._proposals.append((item, fut))
        self._deadlines.watch(
            fut,
            timeout,
            lambda: ProposalTimeout(f"not applied within {timeout}s; it may still commit"),
        )
        self._kick()
        try:
            return await fut
        except Exception:
            self.stats.proposals_failed += 1
            raise

    def _on_messages(self, msgs: Sequence[Message]) -> None:
        room = self.max_inbox - len(self._inbox)
        if len(msgs) > room:
            self.stats.inbox_dropped += len(msgs) - max(room, 0)
            msgs = msgs[: max(room, 0)]
        self._inbox.extend(msgs)
        self._poke()

    def tick(self) -> None:
        """One tick from outside (``fed_ticks``). Ticks that pile up while nothing consumed
        them (this loop or the one feeding it stalled) count as at most ``MAX_FED_TICKS``: a
        stall must not look like an election timeout, as with the driver's own clock."""
        if self._stopping:
            return
        self._ticks = min(self._ticks + 1, MAX_FED_TICKS)
        self._kick()

    def _on_tick(self) -> None:
        self._ticks += 1
        self._kick()

    def _feed(self) -> None:
        """Hand every queued input to the core."""
        core = self.core
        inbox = self._inbox
        while inbox:
            core.step(inbox.popleft())
        while self._ticks:
            self._ticks -= 1
            core.tick()
        props = self._proposals
        while props:
            item, fut = props.popleft()
            if fut.done():  # timed out while queued
                continue
            try:
                if isinstance(item, ConfChange):
                    term, index = core.propose_conf_change(item)
                else:
                    term, index = core.propose(item)
            except RaftError as exc:
                fut.set_exception(exc)
                continue
            self._pending[index] = (term, fut)
        reads = self._reads
        while reads:
            ctx, rfut = reads.popleft()
            if not rfut.done():
                self._read_waits[ctx] = rfut
                core.read_index(ctx)

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as exc:
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        # A failed write must not be retried or skipped: stop serving, say why, and let the
        # owner restart the node (the log is replayed from what is durable).
        log.error("%s: raft loop failed; the driver stops", self.id, exc_info=exc)
        self._stopping = True
        self._ticker.stop()
        self._fail_all(DriverStopped(f"raft driver {self.id} failed: {exc!r}"))

    async def _loop(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._idle = True
            await wake.wait()
            self._idle = False
            wake.clear()
            while not self._stopping:
                if self._ready_loop.inflight is None:
                    self._pump()
                step = self._ready_loop.inflight
                if step is not None:  # parked by the pass: the write is this task's to wait for
                    if self._deferred:
                        await self._durable()
                    else:
                        await loop.run_in_executor(self._executor, self._timed_persist, step.ready)
                    if not self._stopping:
                        self._finish(step)
                    continue
                if self._snapshot_written is not None:
                    self._compact()
                if self._snapshot_due():
                    self._start_snapshot()
                break

    def _poke(self) -> None:
        """New messages arrived: if the loop is idle, run the core right here.

        This saves an event-loop turn per network hop (it is on the commit latency path).
        A Ready that needs a threaded fsync is parked for the loop task, which owns all
        awaiting; until it has been handled every input just queues.
        """
        if not self._idle or self._ready_loop.inflight is not None or self._stopping:
            self._kick()
            return
        self._idle = False
        try:
            self._pump()
        except Exception as exc:
            self._crash(exc)
            return
        finally:
            self._idle = True
        if (
            self._ready_loop.inflight is not None
            or self._snapshot_due()
            or self._snapshot_written is not None
        ):
            self._kick()

    def _pump(self) -> None:
        """Feed inputs and handle Readies until the core is quiet or a Ready must be parked."""
        core = self.core
        ready_loop = self._ready_loop
        while not self._stopping:
            self._feed()
            step = ready_loop.next()
            if step is None:
                return
            rd = step.ready
            self.stats.readies += 1
            if rd.soft_state is not None and rd.soft_state.leader != self._seen_lead:
                self._seen_lead = rd.soft_state.leader
                self.stats.leader_changes += 1
            if step.send_at is SendAt.BEFORE_WRITE:
                self._send(step)
            if self._on_append is not None and rd.entries:
                commit = core.log.commit
                if rd.entries[-1].index > commit:  # a follower catching up has none of these
                    self._on_append(tuple(e for e in rd.entries if e.index > commit))
            if rd.must_sync:
                self.stats.fsync_batches += 1
                self.stats.entries_persisted += len(rd.entries)
                if self._deferred:
                    # Queued in order behind everything before it; the loop task awaits the
                    # disk's word that it is done (the host's fsync) before sending.
                    self._persist_started = time.perf_counter()
                    self.log.persist(rd)
                    self._durable_wait = self.log.durable()  # asked now, with the writes
                    if step.send_at is SendAt.AFTER_WRITE:
                        # The host sends them once the writes before them are done: a
                        # follower acknowledges without a round trip for the barrier's answer.
                        self._send(step)
                    return  # parked: the loop task awaits the disk
                if self._executor is not None and not self._persist_inline():
                    return  # parked: the loop task persists in the thread
                self._timed_persist(rd)
            elif rd.has_writes:
                self.log.persist(rd, sync=False)  # the commit index alone: see Ready.must_sync
            self._finish(step)

    def _persist_inline(self) -> bool:
        """Whether a synced persist runs inline (fast disk) rather than in the thread."""
        return self._inline_fsync and self.fsync_avg_s < INLINE_FSYNC_S

    def _timed_persist(self, rd: Ready) -> None:
        """Persist with an fsync, and fold its duration into ``fsync_avg_s`` (either thread)."""
        start = time.perf_counter()
        self.log.persist(rd)
        self.fsync_avg_s += (time.perf_counter() - start - self.fsync_avg_s) * 0.2

    async def _durable(self) -> None:
        """Wait for a deferred disk, folding the wait into ``fsync_avg_s``."""
        wait, self._durable_wait = self._durable_wait, None
        assert wait is not None
        await wait
        elapsed = time.perf_counter() - self._persist_started
        self.fsync_avg_s += (elapsed - self.fsync_avg_s) * 0.2

    def _finish(self, step: Step) -> None:
        """Everything after a Ready is durable: send (unless sent already), apply, advance."""
        self._send(step)
        self._apply(step.ready)
        self._ready_loop.advance(step)

    def _send(self, step: Step) -> None:
        if step.sent:
            return
        step.sent = True
        rd = step.ready
        if not rd.messages:
            return
        send = self.transport.send
        for m in rd.messages:
            send(m)
        self.transport.flush()

    def _apply(self, rd: Ready) -> None:
        if rd.snapshot is not None and not rd.snapshot.is_empty:
            self.sm.restore(rd.snapshot.data)
            self.applied_index = rd.snapshot.meta.index
            self._last_snapshot = rd.snapshot.meta.index
            self._snapshot_log_bytes = self.log.bytes_written
            self._snapshot_size = len(rd.snapshot.data)
        pending = self._pending
        for entry in rd.committed_entries:
            result = self.sm.apply(entry) if entry.type == EntryType.NORMAL else None
            self.applied_index = entry.index
            if pending:
                self._resolve(entry, result)
        self.stats.applied = self.applied_index
        for rs in rd.read_states:
            rfut = self._read_waits.pop(rs.request_ctx, None)
            if rfut is not None and not rfut.done():
                self._read_ready.append((rs.index, rfut))
        if self._read_ready:
            still = []
            for index, rfut in self._read_ready:
                if rfut.done():
                    continue
                if index <= self.applied_index:
                    rfut.set_result(self.applied_index)
                else:
                    still.append((index, rfut))
            self._read_ready = still

    def _resolve(self, entry: Entry, result: object) -> None:
        pending = self._pending
        p = pending.pop(entry.index, None)
        if p is not None:
            term, fut = p
            if not fut.done():
                if term == entry.term:
                    fut.set_result(result)
                else:
                    fut.set_exception(ProposalDropped(f"entry {entry.index} was replaced"))
        if entry.term > self._pending_min_term:
            # Terms never decrease along a log: a pending proposal of an older term at a later
            # index can no longer commit once an entry of a newer term has.
            self._pending_min_term = entry.term
            stale = [i for i, (t, _) in pending.items() if t < entry.term and i > entry.index]
            for index in stale:
                _, fut = pending.pop(index)
                if not fut.done():
                    fut.set_exception(ProposalDropped(f"entry {index} was replaced"))

    def _snapshot_due(self) -> bool:
        return (
            bool(self.snapshot_every)
            and self._snapshot_task is None
            and self._snapshot_written is None
            and self.applied_index - self._last_snapshot >= self.snapshot_every
            and self.log.bytes_written - self._snapshot_log_bytes >= self._snapshot_size
        )

    def _start_snapshot(self) -> None:
        """Capture the state machine at the applied index and write it in the background.

        Runs in the loop task between passes, so the capture sees every entry up to
        ``applied_index`` and none after it.
        """
        index = self.applied_index
        meta = self.core.snapshot_meta(index)
        capture: Callable[[], Callable[[], bytes]] | None = getattr(
            self.sm, "snapshot_capture", None
        )
        if capture is not None:
            serialise = capture()
        else:
            data = self.sm.snapshot()

            def serialise() -> bytes:
                return data

        self._last_snapshot = index
        self._snapshot_log_bytes = self.log.bytes_written
        if self._snapshot_executor is None:
            self._snapshot_executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"raft-snap-{self.id}"
            )
        self._snapshot_task = asyncio.create_task(
            self._write_snapshot(meta, serialise), name=f"raft-snapshot-{self.id}"
        )

    async def _write_snapshot(self, meta: SnapshotMeta, serialise: Callable[[], bytes]) -> None:
        """Serialise and durably write a snapshot in a worker thread, then hand it to the loop
        task for compaction. The thread touches only the snapshot files, never the segments
        that persists append to, so it may run while the log keeps being written."""

        def write() -> Snapshot:
            snap = Snapshot(meta, serialise())
            self.log.write_snapshot(snap)
            return snap

        loop = asyncio.get_running_loop()
        try:
            snap = await loop.run_in_executor(self._snapshot_executor, write)
            await self.log.durable()  # a host's disk: the file is written before compaction
        except Exception as exc:
            self._crash(exc)
            return
        finally:
            self._snapshot_task = None
        self._snapshot_size = len(snap.data)
        self._snapshot_written = snap
        self._kick()

    def _compact(self) -> None:
        """Compact the log and the core up to the snapshot just written (loop task, between
        passes, with no persist in flight)."""
        snap, self._snapshot_written = self._snapshot_written, None
        if snap is None or self._stopping:
            return
        self.log.drop_covered(snap)
        self.core.compact(snap)
        log.info("%s: snapshot at %d, log compacted", self.id, snap.meta.index)
