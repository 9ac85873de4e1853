"""The KM enclave process's node: Raft, the KM state machine and the enclave, and the protocols
that need them (peer links, joins, releases, ledger signatures).

Everything that holds or derives a secret runs here, in its own OS process; the node's host
process reaches it only through the circuit (``kmnode.circuit``), with typed requests, and gets
back public data; it publishes this process's events (``notify``) and serves the operator API.
The service enclave is this process's child (``kmnode.km.service_link``). Start-up decides the
node's situation from its data directory:

* sealed enclave state present: resume (unseal, replay the Raft log, rejoin the peers);
* nothing, and this is the first node of cluster.yaml: genesis (the master secret is created
  inside the KM enclave, a one-node Raft cluster initialises the ledger), unless the directory
  holds the join marker (a replaced member: it must join the cluster it belonged to);
* nothing otherwise: join (attest to a member, get membership committed, receive the master
  secret over the attested channel, then catch up through Raft).

A Raft log without sealed state is refused: the enclave's state was lost or removed, and
starting anyway would present a node without its keys as a full member. Unless the operator
asked for recovery (the recover marker): then the node replays the ledger without the secret,
serves only status and recovery routes, and rebuilds the secret from the holders' shares
(``kmnode.km.recovery_feed``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from attest.errors import SealingError
from consensus.disk import Disk
from consensus.driver import RaftDriver
from consensus.raft import RaftConfig
from consensus.storage import DurableLog
from consensus.types import NONE, HardState, NotLeader, RaftError, Snapshot
from kmnode.config import ClusterConfig
from kmnode.datadir import (
    JOIN_MARKER,
    RECOVER_MARKER,
    RECOVERY_SESSION,
    RESTORE_SNAPSHOT,
    SEALED_STATE,
)
from kmnode.km import ledger_signer
from kmnode.km.commands import (
    Applied,
    ClusterInitialised,
    MemberChanged,
    PlatformRevoked,
    PolicyChanged,
    PolicyReplaced,
    ProposalChanged,
)
from kmnode.km.contract_feed import ContractFeed
from kmnode.km.data_feed import DataFeed
from kmnode.km.enclave import EnclaveStateError, KMEnclave
from kmnode.km.forwarding import Forwarder
from kmnode.km.join import Joining
from kmnode.km.loader import load_km
from kmnode.km.machine import KMStateMachine
from kmnode.km.peer_transport import Address, AttestedTransport
from kmnode.km.peer_wire import peer_limits
from kmnode.km.recovery_feed import RecoveryFeed
from kmnode.km.releases import EarlyAttestations, Releases
from kmnode.km.service_link import ServiceLink
from kmnode.km.vnet import Net
from kmnode.km_messages import Audit, Event, Notice
from kmnode.linkfaults import FaultRules

log = logging.getLogger(__name__)


#: Applied results after which the peer links are checked again (see ``_on_apply``).
_MEMBERSHIP_OR_POLICY = (
    ClusterInitialised,
    MemberChanged,
    PolicyReplaced,
    PolicyChanged,
    PlatformRevoked,
)

#: Least time between two membership refreshes (see ``_on_refused``).
REFRESH_INTERVAL_S = 2.0


class NodeStartError(Exception):
    """The node cannot start; the message says why and what to do."""


class KMNode:
    """One node's trusted half: lifecycle, the apply hook, and the views operator requests
    use. The protocols live in modules of their own: joining (``join``), releases
    (``releases``), forwarding to the leader (``forwarding``), the ledger's genesis and
    signatures (``ledger_signer``)."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        service: ServiceLink,
        notify: Callable[[Notice], None],
        net: Net,
        disks: tuple[Disk, Disk],
    ) -> None:
        self.config = config
        self.name = name
        #: Peer connections: sockets the host holds, their bytes over the circuit.
        self.net = net
        self.spec = config.node(name)
        self.data_dir = config.state_dir / "nodes" / name
        #: The node directory (sealed state, join marker) and the Raft directory; the host's
        #: (``kmnode.km.host_disk``) unless ``enclave.storage: enclave``.
        self.node_disk, self.raft_disk = disks
        self.enclave: KMEnclave
        self.enclave, self._log_auth = load_km(config, name)
        self.machine = KMStateMachine(self.enclave)
        self.machine.listeners.append(self._on_apply)
        self.service = service
        self.notify = notify
        self.joining = Joining(self)
        self.releases = Releases(self)
        self.contracts = ContractFeed(self)
        self.data = DataFeed(self)
        self.recovery = RecoveryFeed(self)
        limits = peer_limits(config.limits)
        self.enclave.decode_limits = limits.decode
        self.transport = AttestedTransport(
            name,
            self.enclave,
            addresses=self.addresses,
            host=self.spec.host,
            port=self.spec.peer_port,
            on_join=self.joining.serve,
            on_refused=self._on_refused,
            limits=limits,
            net=net,
        )
        self.forwarder = Forwarder(name, self.transport.send)
        #: Chaos: per-link fault rules (inert until a rule is set) and the ring-consumer switch.
        seed = os.environ.get("KMSIM_CHAOS_SEED")
        self.faults = FaultRules(seed=int(seed) if seed and seed.isdigit() else None)
        self.transport.faults = self.faults
        self.driver: RaftDriver | None = None
        #: How this start found the data directory (set by ``start``).
        self.mode: Literal["genesis", "join", "resume", "recover"] = "join"
        self.joined = asyncio.Event()
        #: Set when the node should shut down (signal, or a fatal refusal); see ``exit_code``.
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The membership refresh running after a refused link, and when the last began.
        self._refreshing: asyncio.Task[Any] | None = None
        self._refreshed_at = -REFRESH_INTERVAL_S
        #: Peer connections refused (attestation and protocol failures) by kind.
        self.refusals: dict[str, int] = {}

    # --- views used by the transport and the API ---------------------------------------------

    def addresses(self) -> dict[str, Address]:
        """Where the peers are: committed members' records; before this node's state names a
        cluster, or for a peer its enclave accepts before its own state names it (a member
        that joined while this node was down), cluster.yaml's. An address is only where to
        dial: who answers is proved by the handshake."""
        configured = {n.name: (n.address, n.peer_port) for n in self.config.nodes}
        members = self.enclave.state.members
        if not members:
            return configured
        found = {m.name: (m.host, m.peer_port) for m in members.values()}
        for name in self.enclave.directory().keys() - found.keys():
            if name in configured:
                found[name] = configured[name]
        return found

    @property
    def ready(self) -> bool:
        """Joined, a leader known, the cluster named, and the master secret held (a node in
        recovery mode is not ready: it serves only status and recovery routes)."""
        driver = self.driver
        return (
            driver is not None
            and self.joined.is_set()
            and bool(driver.leader)
            and bool(self.enclave.state.cluster)
            and not self.recovery.recovering
        )

    @property
    def early_attestations(self) -> EarlyAttestations:
        return self.releases.early_attestations

    def member_record(self) -> dict[str, Any]:
        return self.spec.member_record()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # Every record and snapshot carries a tag under a key only this enclave derives: a log
        # the host changed, reordered, or took from another node is refused at start. Opened in
        # a worker thread: a host's disk answers reads over this loop's circuit.
        raft_log = await asyncio.to_thread(
            DurableLog.open, self.raft_disk, fsync=self.config.raft.fsync, auth=self._log_auth
        )
        await raft_log.durable()  # a torn tail it cut off, a first segment it began
        node_files = await asyncio.to_thread(self.node_disk.listing)
        if RESTORE_SNAPSHOT in node_files:
            raft_log = await self._import_snapshot(raft_log)
        persisted = raft_log.initial_state
        has_log = persisted.hard_state.term > 0 or not persisted.snapshot.is_empty
        mode: Literal["genesis", "join", "resume", "recover"]
        recover = has_log and RECOVER_MARKER in node_files
        opened = SEALED_STATE in node_files and await self._open_sealed_state(recover)
        if opened:
            mode = "resume"
            if RECOVER_MARKER in node_files:  # asked to recover, but nothing was lost
                await asyncio.to_thread(self.node_disk.delete, RECOVER_MARKER)
        elif recover:
            mode = "recover"
            await self._recovery_session(node_files)
        elif has_log:
            raft_log.close()
            raise NodeStartError(
                f"{self.data_dir} has a Raft log but no sealed enclave state: the enclave's "
                "state was lost. If every node lost it, recover the cluster with shares "
                "(kmctl up --recover, then kmctl recovery submit); otherwise remove the node "
                "(kmctl members remove) and delete the directory to join it afresh"
            )
        elif self.name == self.config.nodes[0].name and JOIN_MARKER not in node_files:
            self.enclave.genesis()
            self.store_sealed_state()
            mode = "genesis"
        else:
            mode = "join"
        self.mode = mode  # before Raft applies anything: recovery mode changes what applies do
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
            on_append=self.releases.on_append,
            fed_ticks=True,
            # The host holds both files and sockets and does them in the order asked.
            ordered_io=self.config.enclave.storage == "host"
            and self.config.enclave.peer_sockets == "host",
        )
        if self.enclave.binding_error:  # the snapshot just restored names another cluster
            raft_log.close()
            raise NodeStartError(self.enclave.binding_error)
        # The service enclave (a child process: imports, platform load) starts while Raft
        # starts and the join runs; requests to it wait until it is up.
        service_started = asyncio.create_task(self.service.start(), name="service-start")
        await self.driver.start()
        if mode == "join":
            self.spawn(self.joining.join_loop())
        else:
            self.joined.set()
            if mode == "genesis":
                # A one-node cluster has nobody to wait for: lead now, not after a timeout.
                self.driver.campaign()
                self.spawn(ledger_signer.initialise_ledger(self))
        self.spawn(ledger_signer.sign_periodically(self))
        await service_started
        self.spawn(self.contracts.run())
        self.spawn(self.data.run())
        self.spawn(self.recovery.run())
        self.recovery.try_recover()  # a snapshot may already hold the last share
        log.info("%s: started (%s), peer port %d", self.name, mode, self.transport.port)

    async def _import_snapshot(self, raft_log: DurableLog) -> DurableLog:
        """Start the Raft log from the snapshot `kmctl snapshot restore` left in the node's
        directory, once the enclave has judged it (``check_snapshot_import``); refused over an
        existing log, which nothing may overwrite. The log is reopened from what was written."""
        persisted = raft_log.initial_state
        if persisted.hard_state.term > 0 or not persisted.snapshot.is_empty:
            raft_log.close()
            raise NodeStartError(
                f"{self.data_dir} has a Raft log and a snapshot to restore: refusing to "
                f"overwrite the log (remove {RESTORE_SNAPSHOT} to keep it, or restore into an "
                "empty directory)"
            )
        data = await asyncio.to_thread(self.node_disk.read, RESTORE_SNAPSHOT)
        try:
            meta = self.enclave.check_snapshot_import(data)
        except EnclaveStateError as exc:
            raft_log.close()
            raise NodeStartError(f"{RESTORE_SNAPSHOT} refused: {exc}") from None
        hard = HardState(term=meta.term, vote=NONE, commit=meta.index)
        await asyncio.to_thread(raft_log.append, (), hard, Snapshot(meta, data))
        await raft_log.durable()
        raft_log.close()
        await asyncio.to_thread(self.node_disk.delete, RESTORE_SNAPSHOT)
        log.info("%s: restored a snapshot at index %d (term %d)", self.name, meta.index, meta.term)
        return await asyncio.to_thread(
            DurableLog.open, self.raft_disk, fsync=self.config.raft.fsync, auth=self._log_auth
        )

    async def _recovery_session(self, node_files: dict[str, int]) -> None:
        """Resume this node's recovery session (a restart mid-ceremony), or begin one."""
        blob = None
        if RECOVERY_SESSION in node_files:
            blob = await asyncio.to_thread(self.node_disk.read, RECOVERY_SESSION)
        try:
            sealed = self.enclave.recovery_session(blob)
        except SealingError as exc:
            log.warning("%s: the recovery session does not open (%s): a new one", self.name, exc)
            sealed = self.enclave.recovery_session(None)
        if sealed != blob:
            self.node_disk.replace(RECOVERY_SESSION, sealed, sync=True)

    async def _open_sealed_state(self, recover: bool) -> bool:
        """Unseal the enclave's state. A blob this enclave cannot open (a move to a new KM
        build: sealing binds the build; or damage) stops the start, unless the operator asked
        for recovery: then it counts as lost (it is replaced once the rebuilt secret is
        sealed). A failed unseal changes nothing in the enclave."""
        sealed = await asyncio.to_thread(self.node_disk.read, SEALED_STATE)
        try:
            self.enclave.restore_sealed_state(sealed)
        except SealingError as exc:
            if not recover:
                raise
            log.warning("%s: the sealed state does not open (%s): recovering", self.name, exc)
            return False
        return True

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.driver is not None:
            await self.driver.stop()
        await self.service.stop()
        self.releases.close()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this node (cancelled by ``stop``)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def tick(self) -> None:
        """A tick of the host's timer (``Tick``): Raft's only sense of time here."""
        if self.driver is not None:
            self.driver.tick()

    # --- applying -----------------------------------------------------------------------------

    def _on_apply(self, index: int, result: Applied) -> None:
        if isinstance(result, ClusterInitialised):
            self._check_binding()
        if isinstance(result, _MEMBERSHIP_OR_POLICY) or (
            isinstance(result, ProposalChanged) and result.state == "accepted"
        ):
            # Membership or policy may have changed (a passed proposal can remove a member or
            # revoke a platform): links, inbound and outbound, whose peer the committed state
            # no longer accepts close, and new members are linked.
            self.transport.revalidate()
        if (
            isinstance(result, ProposalChanged)
            and self.driver is not None
            and self.driver.is_leader
        ):
            self._publish_proposal(index, result)
        self.releases.on_apply(result)
        self.contracts.on_apply(result)
        self.data.on_apply(result)
        self.recovery.on_apply(result)

    def _publish_proposal(self, index: int, result: ProposalChanged) -> None:
        """Each change of a proposal's state (made, voted on, passed, failed, rejected,
        withdrawn) is an audit record and an MQTT event, published once, by the leader that
        applied it."""
        proposal = self.enclave.state.proposals[result.proposal]
        record = {
            "index": index,
            "proposal": result.proposal,
            "state": result.state,
            "proposer": proposal.proposer,
            "actions": proposal.actions,
            "votes_for": result.votes_for,
            "votes_against": result.votes_against,
            "needed": result.needed,
            "error": result.error,
        }
        self.publish_audit(record)
        self.publish_event(f"proposal.{result.state}", **record)

    def _check_binding(self) -> None:
        """Stop if the ledger belongs to another cluster than the sealed state; store the
        sealed state again once it has learnt the genesis hash it is bound to."""
        enclave = self.enclave
        if enclave.binding_error:
            if not self.stop_requested.is_set():
                log.error("%s: %s; the node stops", self.name, enclave.binding_error)
                self.publish_event("node.binding_refused", reason=enclave.binding_error)
                self.exit_code = 1
                self.stop_requested.set()
            return
        if enclave.sealed_dirty and enclave.has_master_secret:
            self.store_sealed_state()

    def store_sealed_state(self) -> None:
        """Replace the sealed blob; on a host's disk it is durable by the next Raft write's
        barrier (one queue serves both directories), so before anything it enabled is."""
        self.node_disk.replace(SEALED_STATE, self.enclave.sealed_state(), sync=True)

    def release_done(self, release_id: str) -> bool:
        return self.releases.done(release_id)

    async def wait_release(self, release_id: str, timeout: float) -> bool:
        return await self.releases.wait(release_id, timeout)

    # --- proposing --------------------------------------------------------------------------

    def raft(self) -> RaftDriver:
        if self.driver is None:
            raise RaftError("the node has not started")
        return self.driver

    async def propose(self, command: bytes, timeout: float = 5.0) -> Applied:
        """Propose on this node, which must be the leader (raises NotLeader otherwise); the
        command's result once it is applied here."""
        result = await self.raft().propose(command, timeout=timeout)
        assert isinstance(result, Applied)
        return result

    # --- events -----------------------------------------------------------------------------

    def publish_event(self, kind: str, **fields: Any) -> None:
        """An event for the host to publish on MQTT (public fields only)."""
        self.notify(Event(kind=kind, fields={"time": time.time(), **fields}))

    def publish_audit(self, record: dict[str, Any]) -> None:
        self.notify(Audit(record=record))

    def _on_refused(self, peer: str, reason: str) -> None:
        self.publish_event("peer.refused", peer=peer, reason=reason)
        # By kind (the exception's name before the colon) for ``/metrics``: a few kinds.
        kind = reason.split(":", 1)[0][:60] if ":" in reason else "other"
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        # Perhaps a member this node has not read about yet (it joined while this node was
        # down): learn the committed membership from another member. At most one refresh at
        # a time and one per REFRESH_INTERVAL_S, so refused connections cannot make work.
        now = time.monotonic()
        if (
            self.joined.is_set()
            and self._refreshing is None
            and now - self._refreshed_at >= REFRESH_INTERVAL_S
        ):
            self._refreshed_at = now
            self._refreshing = self.spawn(self.joining.refresh_membership())
            self._refreshing.add_done_callback(self._refresh_done)

    def _refresh_done(self, task: asyncio.Task[Any]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is None and task.result():
            self.transport.refresh_peers()


__all__ = ["KMNode", "NodeStartError", "NotLeader"]
