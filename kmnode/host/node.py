"""One KM node's host process: the untrusted half around two enclave processes.

The node is three processes. This one, the host, owns the operator API, MQTT, the service
enclave's output ring and its child, the KM enclave process (``kmnode.km.process``: Raft, the
KM state machine, the peer links and every secret), reached through the circuit of two
shared-memory rings (``kmnode.host.km_link``). The service enclave process is the KM enclave
process's child. The host holds no key, channel key or master secret: it moves requests,
public replies and the service enclave's public output.

How the node starts (genesis, join or resume) is decided by the KM enclave process from the
data directory; see ``kmnode.km.node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from kmnode.config import ClusterConfig
from kmnode.host.blob_host import BlobHost
from kmnode.host.contract_host import ContractHost
from kmnode.host.faults import RingStall
from kmnode.host.km_link import EnclaveExited, KMLink
from kmnode.host.mqtt import EventPublisher, TopicKind
from kmnode.host.poison import Poisoner
from kmnode.host.service_output import RingFailure, ServiceOutput
from kmnode.km_messages import Audit, Event, Notice

log = logging.getLogger(__name__)
#: How a service enclave's contract result record begins (``service.contract_requests``).
CONTRACT_RESULT_PREFIX = b'{"kind":"contract.result"'
DATA_RESULT_PREFIX = b'{"kind":"data.result"'


class NodeStartError(Exception):
    """The node cannot start; the message says why and what to do."""


class KMNode:
    """A node's host: starts and stops its enclave processes, publishes what they report."""

    def __init__(self, config: ClusterConfig, config_path: Path, name: str) -> None:
        self.config = config
        self.name = name
        self.spec = config.node(name)
        self.data_dir = config.state_dir / "nodes" / name
        self.events = EventPublisher.from_config(config, name)
        self.ring_stall = RingStall()
        self.service_output = ServiceOutput(
            name, self._on_service_output, self.ring_stall, self._on_service_ring_failed
        )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        #: Contract state: the store the service enclave reaches, in the data directory.
        self.contracts = ContractHost(self.data_dir, fsync=config.raft.fsync)
        self.blobs = BlobHost(self.data_dir)
        self.km = KMLink(
            config,
            config_path,
            name,
            self.service_output,
            self._on_notice,
            contract_store=self.contracts.address,
        )
        #: The chaos fault ``poison``: idle unless an admin turns it on (chaos routes).
        self.poisoner = Poisoner(
            lambda: self.km.circuit,
            (self.spec.address, self.spec.api_port),
            lambda: [(n.address, n.peer_port) for n in config.nodes],
        )
        #: Set when the node should shut down (signal, or the enclave stopped); see ``exit_code``.
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.events.start()
        self.service_output.start()
        try:
            mode = await self.km.start()
        except EnclaveExited as exc:
            # Nothing runs half-started: the caller gets the reason and nothing to stop.
            await self.stop()
            raise NodeStartError(str(exc)) from None
        self._watch = asyncio.create_task(self._watch_enclave(), name="km-enclave-stopped")
        self.publish_event("node.started", mode=mode)
        log.info("%s: started (%s), peer port %d", self.name, mode, self.spec.peer_port)

    async def _watch_enclave(self) -> None:
        await self.km.stopped.wait()
        if not self.stop_requested.is_set():
            log.error("%s: the KM enclave stopped: %s", self.name, self.km.stop_reason)
            self.exit_code = self.km.exit_code or 1
            self.stop_requested.set()

    async def stop(self) -> None:
        await self.poisoner.stop()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.km.stop()
        await self.service_output.stop()
        self.contracts.close()
        await self.events.stop()

    # --- what the enclaves report -------------------------------------------------------------

    def publish_event(self, kind: str, **fields: Any) -> None:
        self.events.publish(
            TopicKind.EVENTS, {"event": kind, "node": self.name, "time": time.time(), **fields}
        )

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, Event):
            event = {"event": notice.kind, "node": self.name, **notice.fields}
            self.events.publish(TopicKind.EVENTS, event)
            owner = notice.fields.get("owner")
            if notice.kind == "data.request" and isinstance(owner, str):
                # The request an owner is asked to approve, on the owner's own topic.
                self.events.publish_party("owners", owner, "requests", event)
        elif isinstance(notice, Audit):
            # One audit record per release: coalesced with its neighbours into one MQTT
            # message under load (a message per record cost the broker as much CPU as a
            # follower's Raft).
            self.events.publish_record(TopicKind.AUDIT, notice.record)

    def _on_service_ring_failed(self, failure: RingFailure) -> None:
        self.publish_event(
            "service.ring_failed",
            error=failure.error,
            replaced=failure.replaced,
            replacements=failure.replacements,
        )

    def _on_service_output(self, record: bytes) -> None:
        with contextlib.suppress(ValueError):
            if record.startswith(CONTRACT_RESULT_PREFIX):
                # One per executed call on every node: coalesced with its neighbours under
                # load (a message each cost the broker as much CPU as a service enclave).
                self.events.publish_record(TopicKind.SERVICE, json.loads(record))
            elif record.startswith(DATA_RESULT_PREFIX):
                # A computation's end, its result sealed to the user: on the user's topic.
                result = json.loads(record)
                self.events.publish(TopicKind.SERVICE, record)
                self.events.publish_party("users", str(result.get("user")), "results", result)
            else:
                self.events.publish(TopicKind.SERVICE, record)


__all__ = ["KMNode", "NodeStartError"]
