"""One KM node process: the untrusted host around a KM enclave and a service enclave.

The host owns the sockets, the data directory, the service child process and MQTT; it drives
the KM enclave but only ever handles ciphertext of key material (sealed state, channel frames,
keys encrypted to the service enclave). Start-up decides the node's situation from its data
directory:

* sealed enclave state present: resume (unseal, replay the Raft log, rejoin the peers);
* nothing, and this is the first node of cluster.yaml: genesis (the master secret is created
  inside the KM enclave, a one-node Raft cluster initialises the ledger), unless the directory
  holds the join marker (a replaced member: it must join the cluster it belonged to);
* nothing otherwise: join (attest to a member, get membership committed, receive the master
  secret over the attested channel, then catch up through Raft).

A Raft log without sealed state is refused: the enclave's state was lost or removed, and
starting anyway would present a node without its keys as a full member.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from attest.errors import AttestationError
from consensus.deadlines import Deadlines
from consensus.driver import RaftDriver
from consensus.raft import RaftConfig
from consensus.storage import DurableLog
from consensus.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Message,
    MessageType,
    NotLeader,
    RaftError,
)
from kmnode.config import ClusterConfig
from kmnode.datadir import JOIN_MARKER, RAFT_DIR, SEALED_STATE
from kmnode.host.faults import FaultRules, RingStall
from kmnode.host.mqtt import EventPublisher, TopicKind
from kmnode.host.peer_transport import Address, AttestedTransport
from kmnode.host.peer_wire import (
    CHANNEL,
    JOIN,
    PeerProtocolError,
    PeerRefused,
    encode_frame,
    expect,
    initiate,
)
from kmnode.host.service_link import ServiceLink, ServiceUnavailable
from kmnode.km.enclave import (
    EnclaveStateError,
    JoinReply,
    JoinRequest,
    KMEnclave,
    ProvisionResult,
)
from kmnode.km.loader import load_km_enclave
from kmnode.km.machine import KMStateMachine
from kmnode.km.state import Release, encode_command

log = logging.getLogger(__name__)
#: Marks a release request in a command's canonical JSON (``encode_command``).
_RELEASE_REQUEST = b'"op":"release.request"'
#: Early local attestations kept for releases that have not committed (see ``_on_append``).
MAX_EARLY_ATTESTATIONS = 1024
#: Largest join request or reply frame read from a peer.
MAX_JOIN_FRAME = 64 * 1024
#: Forwarded commands per proposal message, in bytes: far below the 8 MiB peer frame limit.
FORWARD_BATCH_BYTES = 1 << 20


def split_by_size(entries: list[Entry], limit: int) -> list[tuple[Entry, ...]]:
    """Consecutive runs of ``entries``, in order, each holding at most ``limit`` bytes of data
    (an entry larger than ``limit`` travels alone)."""
    batches: list[tuple[Entry, ...]] = []
    start, size = 0, 0
    for i, entry in enumerate(entries):
        if i > start and size + len(entry.data) > limit:
            batches.append(tuple(entries[start:i]))
            start, size = i, 0
        size += len(entry.data)
    if start < len(entries):
        batches.append(tuple(entries[start:]))
    return batches


@dataclasses.dataclass
class EarlyAttestations:
    """Service attestations started when a release to this node entered the log (before it
    committed), and how many of them a committed release went on to use."""

    started: int = 0
    used: int = 0


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a background future's failure as seen: an early attestation nobody ends up
    using must not be reported as an exception that was never retrieved."""
    if not future.cancelled():
        future.exception()


class _ReleaseWaitTimedOut(Exception):
    """A release wait ran out of time (``wait_release`` returns False)."""


JOIN_TIMEOUT = 15.0


class NodeStartError(Exception):
    """The node cannot start; the message says why and what to do."""


class JoinRefused(Exception):
    """A member refused this node's join request, with the reason."""


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KMNode:
    def __init__(self, config: ClusterConfig, config_path: Path, name: str) -> None:
        self.config = config
        self.name = name
        self.spec = config.node(name)
        self.data_dir = config.state_dir / "nodes" / name
        self.enclave: KMEnclave = load_km_enclave(config, name)
        self.machine = KMStateMachine(self.enclave)
        self.machine.listeners.append(self._on_apply)
        self.events = EventPublisher.from_config(config, name)
        self.ring_stall = RingStall()
        self.service = ServiceLink(
            config_path,
            name,
            self._on_service_output,
            self.data_dir / "service.log",
            stall=self.ring_stall,
        )
        self.transport = AttestedTransport(
            name,
            self.enclave,
            addresses=self.addresses,
            host=self.spec.host,
            port=self.spec.peer_port,
            on_join=self._serve_join,
            on_refused=self._on_refused,
        )
        #: Chaos: per-link fault rules (inert until a rule is set) and the ring-consumer switch.
        seed = os.environ.get("KMSIM_CHAOS_SEED")
        self.faults = FaultRules(seed=int(seed) if seed and seed.isdigit() else None)
        self.transport.faults = self.faults
        self.driver: RaftDriver | None = None
        self.joined = asyncio.Event()
        #: Set when the node should shut down (signal, or a fatal refusal); see ``exit_code``.
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self._release_waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: Local attestations started for releases to this node not yet committed (``_on_append``).
        self._early_attestations: dict[str, asyncio.Task[tuple[bytes, bytes]]] = {}
        #: Local attestations started before their release committed, and those used.
        self.early_attestations = EarlyAttestations()
        self._name_json = json.dumps({"node": self.name}, separators=(",", ":"))[1:-1].encode()
        #: Commands to forward to the leader at the end of this turn (``_forward_to_leader``).
        self._forwarding: dict[str, list[Entry]] = {}
        #: Timeouts of release waits (one timer for all: see ``consensus.deadlines``).
        self._deadlines = Deadlines()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- views used by the transport and the API ---------------------------------------------

    def addresses(self) -> dict[str, Address]:
        members = self.enclave.state.members
        if members:
            return {m.name: (m.host, m.peer_port) for m in members.values()}
        return {n.name: (n.host, n.peer_port) for n in self.config.nodes}

    @property
    def ready(self) -> bool:
        driver = self.driver
        return (
            driver is not None
            and self.joined.is_set()
            and bool(driver.leader)
            and bool(self.enclave.state.cluster)
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sealed_path = self.data_dir / SEALED_STATE
        raft_log = DurableLog.open(self.data_dir / RAFT_DIR, fsync=self.config.raft.fsync)
        persisted = raft_log.initial_state
        has_log = persisted.hard_state.term > 0 or not persisted.snapshot.is_empty
        if sealed_path.exists():
            self.enclave.restore_sealed_state(sealed_path.read_bytes())
            mode = "resume"
        elif has_log:
            raft_log.close()
            raise NodeStartError(
                f"{self.data_dir} has a Raft log but no sealed enclave state: the enclave's "
                "state was lost; remove the node (kmctl members remove) and delete the directory "
                "to join it afresh"
            )
        elif self.name == self.config.nodes[0].name and not self._replaced():
            self.enclave.genesis()
            _write_atomic(sealed_path, self.enclave.sealed_state())
            mode = "genesis"
        else:
            mode = "join"
        raft = self.config.raft
        self.driver = RaftDriver(
            RaftConfig(
                id=self.name,
                peers=(self.name,) if mode == "genesis" else (),
                election_tick=raft.election_ticks,
                heartbeat_tick=raft.heartbeat_ticks,
            ),
            raft_log,
            self.transport,
            self.machine,
            tick_interval=raft.tick_ms / 1000,
            on_append=self._on_append,
        )
        if self.enclave.binding_error:  # the snapshot just restored names another cluster
            raft_log.close()
            raise NodeStartError(self.enclave.binding_error)
        self.events.start()
        # The service enclave (a child process: imports, platform load) starts while Raft
        # starts and the join runs; requests to it wait until it is up.
        service_started = asyncio.create_task(self.service.start(), name="service-start")
        await self.driver.start()
        if mode == "join":
            self._spawn(self._join_loop())
        else:
            self.joined.set()
            if mode == "genesis":
                # A one-node cluster has nobody to wait for: lead now, not after a timeout.
                self.driver.campaign()
                self._spawn(self._initialise_ledger())
        self._spawn(self._sign_ledger_periodically())
        await service_started
        self._publish_event("node.started", mode=mode, service=self.service.measurement)
        log.info("%s: started (%s), peer port %d", self.name, mode, self.transport.port)

    def _replaced(self) -> bool:
        return (self.data_dir / JOIN_MARKER).exists()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.driver is not None:
            await self.driver.stop()
        await self.service.stop()
        await self.events.stop()
        self._deadlines.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this node (cancelled by ``stop``)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- applying and waiting ---------------------------------------------------------------

    def _on_apply(self, index: int, result: dict[str, Any]) -> None:
        if result.get("ok"):
            if "cluster" in result:
                self._check_binding()
            if "member" in result or "cluster" in result:
                self.transport.refresh_peers()
            if result.get("node") == self.name and "generation" in result and "release" in result:
                self._spawn(self._provision(str(result["release"])))
        if result.get("ok") and "status" in result and "release" in result:
            for future in self._release_waiters.pop(str(result["release"]), []):
                if not future.done():
                    future.set_result(None)

    def _check_binding(self) -> None:
        """Stop if the ledger belongs to another cluster than the sealed state; store the
        sealed state again once it has learnt the genesis hash it is bound to."""
        enclave = self.enclave
        if enclave.binding_error:
            if not self.stop_requested.is_set():
                log.error("%s: %s; the node stops", self.name, enclave.binding_error)
                self._publish_event("node.binding_refused", reason=enclave.binding_error)
                self.exit_code = 1
                self.stop_requested.set()
            return
        if enclave.sealed_dirty and enclave.has_master_secret:
            _write_atomic(self.data_dir / SEALED_STATE, enclave.sealed_state())

    def release_done(self, release_id: str) -> bool:
        release = self.enclave.state.releases.get(release_id)
        return release is not None and release.status != "requested"

    async def wait_release(self, release_id: str, timeout: float) -> bool:
        """Wait until the outcome of ``release_id`` is applied here; False on timeout.

        Waiters are keyed by release, so an apply wakes only the callers it concerns (checking
        every waiter on every apply cost a sixth of the leader's CPU under load).
        """
        if self.release_done(release_id):
            return True
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._release_waiters.setdefault(release_id, []).append(future)
        self._deadlines.watch(future, timeout, _ReleaseWaitTimedOut)
        try:
            await future
        except _ReleaseWaitTimedOut:
            waiters = self._release_waiters.get(release_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._release_waiters.pop(release_id, None)
            return False
        return True

    # --- proposing --------------------------------------------------------------------------

    def _driver(self) -> RaftDriver:
        if self.driver is None:
            raise RaftError("the node has not started")
        return self.driver

    async def propose(self, command: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """Propose on this node, which must be the leader (raises NotLeader otherwise)."""
        result = await self._driver().propose(command, timeout=timeout)
        assert isinstance(result, dict)
        return result

    async def propose_outcome(self, command: bytes, release_id: str, timeout: float = 10.0) -> bool:
        """Get a release outcome committed from any node: propose locally if leader, else
        forward it to the leader, until the release's outcome is applied here. A retry may
        commit twice; the state machine refuses the duplicate, so this is idempotent."""
        done = functools.partial(self.release_done, release_id)
        driver = self._driver()
        deadline = time.monotonic() + timeout
        for _ in range(50):
            remaining = deadline - time.monotonic()
            if done() or remaining <= 0:
                break
            if driver.is_leader:
                with contextlib.suppress(RaftError):
                    await driver.propose(command, timeout=min(remaining, 5.0))
            elif driver.leader:
                self._forward_to_leader(driver.leader, command)
            await self.wait_release(release_id, min(max(remaining, 0.0), 1.0))
        return done()

    def _forward_to_leader(self, leader: str, command: bytes) -> None:
        """Queue ``command`` for ``leader``: the commands of one event-loop turn (the outcomes
        of a whole applied batch, under load) leave as one proposal message, not one each."""
        if not self._forwarding:
            asyncio.get_running_loop().call_soon(self._send_forwarded)
        self._forwarding.setdefault(leader, []).append(Entry(0, 0, EntryType.NORMAL, command))

    def _send_forwarded(self) -> None:
        batches, self._forwarding = self._forwarding, {}
        for leader, entries in batches.items():
            for batch in split_by_size(entries, FORWARD_BATCH_BYTES):
                self.transport.send(
                    Message(MessageType.PROPOSE, to=leader, frm=self.name, entries=batch)
                )

    # --- genesis, join, ledger ----------------------------------------------------------------

    def member_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform_id": self.spec.platform.id,
            "host": self.spec.host,
            "peer_port": self.spec.peer_port,
            "api_port": self.spec.api_port,
        }

    async def _initialise_ledger(self) -> None:
        driver = self._driver()
        for _ in range(200):
            if self.enclave.state.cluster:
                return
            if driver.is_leader:
                command = encode_command(
                    "cluster.init",
                    cluster=self.config.cluster,
                    cluster_id=self.enclave.cluster_id,
                    policy=self.enclave.state.policy.to_dict(),
                    member=self.member_record(),
                )
                with contextlib.suppress(RaftError):
                    await driver.propose(command)
                    self._publish_event("cluster.genesis", cluster=self.config.cluster)
                    return
            await asyncio.sleep(0.05)

    async def _join_loop(self) -> None:
        """Ask members (the leader they name first) until one admits this node.

        Bounded: about 1,000 rounds of at most 0.5 s. Unreachable members and "busy" or
        "redirect" answers are retried; a refusal (policy, identity) stops the node.
        """
        by_name = {n.name: n for n in self.config.nodes if n.name != self.name}
        hint = ""
        delay = 0.05
        for _ in range(1000):
            order = ([by_name[hint]] if hint in by_name else []) + [
                n for n in by_name.values() if n.name != hint
            ]
            hint = ""
            for node in order:
                try:
                    answer = await self._join_via(node.name, (node.host, node.peer_port))
                except (OSError, TimeoutError, asyncio.IncompleteReadError, PeerProtocolError):
                    continue
                except (PeerRefused, JoinRefused, AttestationError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    log.error("%s: join refused by %s: %s", self.name, node.name, reason)
                    self._publish_event("join.refused", by=node.name, reason=reason)
                    self.exit_code = 1
                    self.stop_requested.set()
                    return
                if answer is None:
                    self.joined.set()
                    self.enclave.check_binding()  # the log may have arrived before the secret
                    _write_atomic(self.data_dir / SEALED_STATE, self.enclave.sealed_state())
                    self._publish_event("node.joined", via=node.name)
                    return
                hint = answer
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def _join_via(self, peer: str, address: Address) -> str | None:
        """One join attempt; returns None when admitted, else the leader hint to retry with."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 2.0)
        try:
            session = await initiate(self.enclave, reader, writer, JOIN, peer)
            try:
                spec = self.spec
                request = self.enclave.join_request(
                    session, spec.host, spec.peer_port, spec.api_port
                )
                writer.write(encode_frame(CHANNEL, request))
                async with asyncio.timeout(JOIN_TIMEOUT):
                    frame = await expect(reader, CHANNEL, MAX_JOIN_FRAME)
                    try:
                        reply = self.enclave.open_join_reply(session, frame)
                    except EnclaveStateError as exc:
                        raise PeerProtocolError(f"join reply refused: {exc}") from exc
                if reply.status in ("redirect", "busy"):
                    return reply.leader
                if reply.status != "admitted":
                    raise JoinRefused(reply.reason or reply.status)
                return None
            finally:
                self.enclave.close_session(session)
        finally:
            writer.close()

    async def _serve_join(
        self, session: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Member side of a join: the joiner's quote already passed the replicated policy."""
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                frame = await expect(reader, CHANNEL, MAX_JOIN_FRAME)
                try:
                    request = self.enclave.open_join_request(session, frame)
                except EnclaveStateError as exc:
                    raise PeerProtocolError(f"join request refused: {exc}") from exc
                reply = await self._admit(request)
                try:
                    sealed = self.enclave.join_reply(session, reply)
                except EnclaveStateError as exc:
                    # The enclave did not find the admission it needs in its own state (it
                    # changed meanwhile): the joiner asks again.
                    sealed = self.enclave.join_reply(session, JoinReply("busy", reason=str(exc)))
                    reply = JoinReply("busy")
                writer.write(encode_frame(CHANNEL, sealed))
                if reply.status == "admitted":
                    self._publish_event(
                        "member.admitted", member=request.name, platform=request.platform_id
                    )
                await writer.drain()
        finally:
            self.enclave.close_session(session)

    async def _admit(self, request: JoinRequest) -> JoinReply:
        driver = self._driver()
        if not driver.is_leader:
            return JoinReply("redirect", leader=driver.leader)
        peer_name, platform_id = request.name, request.platform_id
        existing = self.enclave.state.members.get(peer_name)
        if existing is None:
            result = await self.propose(encode_command("member.add", member=request.record()))
            if not result.get("ok"):
                return JoinReply("refused", reason=str(result.get("error", "refused")))
        elif existing.platform_id != platform_id:
            return JoinReply("refused", reason=f"{peer_name} is a member on another platform")
        if peer_name not in driver.status.conf.voters:
            try:
                await driver.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, peer_name))
            except RaftError as exc:
                # Another membership change is still in flight (joins are single-server
                # changes, one at a time): the joiner retries shortly.
                return JoinReply("busy", reason=str(exc))
        return JoinReply("admitted")

    async def _sign_ledger_periodically(self) -> None:
        """The leader's enclave signs the hash chain every ``sign_every_entries`` commands, or
        after ``sign_interval_s`` if anything is unsigned, so `kmctl ledger verify` can vouch
        for a copied ledger offline."""
        spec = self.config.ledger
        last_attempt = time.monotonic()
        while True:
            await asyncio.sleep(min(spec.sign_interval_s, 0.2))
            driver = self._driver()
            state = self.enclave.state
            unsigned = state.applied_index - state.last_signature_entry
            due = unsigned >= spec.sign_every_entries or (
                unsigned > 0 and time.monotonic() - last_attempt >= spec.sign_interval_s
            )
            if not driver.is_leader or not state.cluster or not due:
                continue
            last_attempt = time.monotonic()
            command = encode_command("ledger.sign", **self.enclave.ledger_signature(time.time()))
            with contextlib.suppress(RaftError):
                await driver.propose(command)

    # --- releases ---------------------------------------------------------------------------

    def _on_append(self, entries: tuple[Entry, ...]) -> None:
        """Start attesting our service enclave as soon as a release to this node is in the log.

        The challenge and its answer then travel while the request is still being committed
        (a pipe round trip off every release's latency). Nothing is decided on it: the report
        is checked, against the policy of that moment, and the key provisioned, only once the
        release is committed (``_provision``). An entry that is replaced before it commits
        leaves an unused challenge behind, which expires.
        """
        for entry in entries:
            data = entry.data
            if _RELEASE_REQUEST not in data or self._name_json not in data:
                continue
            try:
                command = json.loads(data)
            except ValueError:
                continue
            if command.get("node") != self.name:
                continue
            release_id = f"r{entry.index}"
            early = self._early_attestations
            if release_id in early:  # the same entry sent again (or replaced): one will do
                continue
            attestation = self._spawn(self._attest_service())
            self.early_attestations.started += 1
            attestation.add_done_callback(_consume_outcome)
            early[release_id] = attestation
            if len(early) > MAX_EARLY_ATTESTATIONS:
                early.pop(next(iter(early))).cancel()

    async def _attest_service(self) -> tuple[bytes, bytes]:
        """One local-attestation exchange with our service enclave: (challenge, response)."""
        challenge = self.enclave.new_challenge()
        reply = await self.service.request(
            {
                "op": "challenge",
                "km_measurement": self.enclave.identity.measurement.hex(),
                "challenge": challenge.hex(),
            }
        )
        return challenge, bytes.fromhex(reply["response"])

    async def _provision_to_service(self, release: Release) -> ProvisionResult:
        """Check the attestation and hand the key over. An answer obtained while the release
        was being committed is used first; if the enclave that gave it is gone by now (the key
        cannot be delivered to it), once more with a fresh challenge."""
        early = self._early_attestations.pop(release.id, None)
        for attempt in (early, None) if early is not None else (None,):
            try:
                source = attempt if attempt is not None else self._attest_service()
                challenge, response = await source
                if attempt is not None:
                    self.early_attestations.used += 1
                outcome = self.enclave.provision(release.id, challenge, response)
                if outcome.ok:
                    await self.service.request(
                        {"op": "key", "ciphertext": outcome.ciphertext.hex()}
                    )
                return outcome
            except ServiceUnavailable:
                if attempt is None:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _provision(self, release_id: str) -> None:
        """Local attestation of our service enclave, key provisioning, then the audit record."""
        state = self.enclave.state
        release = state.releases.get(release_id)
        if release is None or release.status != "requested":
            return
        try:
            outcome = await self._provision_to_service(release)
            status, reason = ("provisioned", "") if outcome.ok else ("refused", outcome.reason)
            measurement = outcome.service_measurement
        except ServiceUnavailable as exc:
            status, reason, measurement = "refused", f"service enclave unavailable: {exc}", ""
        command = encode_command(
            "release.outcome",
            release=release_id,
            node=self.name,
            status=status,
            reason=reason,
            service_measurement=measurement,
        )
        committed = await self.propose_outcome(command, release_id)
        record = {
            "release": release_id,
            "key": release.key,
            "generation": release.generation,
            "status": status,
            "reason": reason,
            "committed": committed,
        }
        # One audit record per release: coalesced with its neighbours into one MQTT message
        # under load (a message per record cost the broker as much CPU as a follower's Raft).
        self.events.publish_record(TopicKind.AUDIT, record)
        if status == "refused":
            log.warning("%s: release %s refused: %s", self.name, release_id, reason)

    # --- events -----------------------------------------------------------------------------

    def _publish_event(self, kind: str, **fields: Any) -> None:
        self.events.publish(
            TopicKind.EVENTS, {"event": kind, "node": self.name, "time": time.time(), **fields}
        )

    def _on_refused(self, peer: str, reason: str) -> None:
        self._publish_event("peer.refused", peer=peer, reason=reason)

    def _on_service_output(self, record: bytes) -> None:
        with contextlib.suppress(ValueError):
            self.events.publish(TopicKind.SERVICE, record)


__all__ = ["KMNode", "NodeStartError", "NotLeader"]
