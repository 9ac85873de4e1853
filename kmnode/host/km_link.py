"""The host's side of the KM enclave: its child process and the circuit to it.

The host creates the two rings (it owns the shared memory), starts ``kmnode.km.process`` with
their names (and the descriptors of the service enclave's output ring, which the host drains,
for the KM enclave process to pass on), and from then on talks to the enclave only in typed
circuit messages: it asks (operator requests, status, proofs), and publishes the enclave's
events. The enclave's stdin is a pipe the host holds open: if the host dies, however it dies,
the pipe closes and the enclave stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from consensus.ticker import Ticker
from kmnode.circuit import CIRCUIT_CAPACITY, Circuit, CircuitClosed
from kmnode.config import ClusterConfig
from kmnode.datadir import RAFT_DIR
from kmnode.host.disks import HostDisks
from kmnode.host.service_output import ServiceOutput
from kmnode.host.sockets import PeerSockets
from kmnode.km_messages import (
    Ack,
    Closed,
    Connect,
    Data,
    DiskBarrier,
    DiskList,
    DiskOp,
    DiskRead,
    Failed,
    Listen,
    Notice,
    Reply,
    Request,
    Started,
    Stopping,
    StopRequest,
    Tick,
)
from kmnode.ring import Ring

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Reply)
#: How long the enclave may take to start (unseal, replay the log) before the node gives up.
START_TIMEOUT = 120.0


class EnclaveExited(Exception):
    """The KM enclave process is gone or refused to start; the message says why."""


class KMLink:
    def __init__(
        self,
        config: ClusterConfig,
        config_path: Path,
        name: str,
        service_output: ServiceOutput,
        on_notice: Callable[[Notice], None],
        contract_store: str = "",
    ) -> None:
        self.config = config
        #: The contract store's socket address (``kmnode.host.contract_host``), passed on.
        self.contract_store = contract_store
        self.config_path = config_path
        self.name = name
        #: Its ring and ring-control socket are passed on to the service enclave (at start).
        self.service_output = service_output
        self.on_notice = on_notice
        self._rings: list[Ring] = []
        self._bells: list[int] = []
        self._proc: asyncio.subprocess.Process | None = None
        self.circuit: Circuit | None = None
        self.mode = ""
        self._started: asyncio.Future[str] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._ticker: Ticker | None = None
        #: Set when the enclave stops on its own (refused its state, lost the cluster).
        self.stopped = asyncio.Event()
        #: The peer sockets the enclave's connections run on.
        self.sockets = PeerSockets(name, self._to_enclave)
        #: The enclave's files, when the host holds them (``enclave.storage: host``).
        self.disks: HostDisks | None = None
        if config.enclave.storage == "host":
            node_dir = config.state_dir / "nodes" / name
            self.disks = HostDisks(node_dir, node_dir / RAFT_DIR)
        self.exit_code = 0
        self.stop_reason = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> str:
        """Start the enclave process; returns how it started (genesis, join, resume)."""
        # Sealed memfds (no shrink, no grow), handed over by descriptor: the enclave checks the
        # seals and the size, so the host cannot pull the memory from under it (SIGBUS); and
        # they vanish with the processes, so a killed node leaves nothing in /dev/shm.
        self._rings = [
            Ring.create_sealed(CIRCUIT_CAPACITY, label=f"kmsim-{self.name}-kmin"),
            Ring.create_sealed(CIRCUIT_CAPACITY, label=f"kmsim-{self.name}-kmout"),
        ]
        self._started = asyncio.get_running_loop().create_future()
        # Doorbells: (read end, write end) of host -> enclave and of enclave -> host.
        to_enclave, to_host = os.pipe(), os.pipe()
        self._bells = [to_enclave[1], to_host[0]]
        self.circuit = Circuit(
            self._rings[1],
            self._rings[0],
            bell_in=to_host[0],
            bell_out=to_enclave[1],
            on_request=self._on_request,
            on_notice=self._notice,
            name=f"{self.name}-host",
        )
        self.circuit.start()
        # Raft's clock: the enclave has none of its own (``Tick``).
        self._ticker = Ticker(self.config.raft.tick_ms / 1000, self._tick)
        self._ticker.start()
        # Its log lines go where the host's go (the node's log): one story per node.
        service = self.service_output.handoff
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kmnode.km.process",
            "--config",
            str(self.config_path),
            "--node",
            self.name,
            "--ring-in-fd",
            str(self._rings[0].fileno()),
            "--ring-out-fd",
            str(self._rings[1].fileno()),
            "--bell-in",
            str(to_enclave[0]),
            "--bell-out",
            str(to_host[1]),
            "--service-ring-fd",
            str(service.ring_fd),
            "--service-ring-control",
            str(service.control_fd),
            "--circuit",
            self.config.enclave.circuit,
            "--contract-store",
            self.contract_store,
            stdin=asyncio.subprocess.PIPE,
            pass_fds=(
                to_enclave[0],
                to_host[1],
                self._rings[0].fileno(),
                self._rings[1].fileno(),
                *service.fds,
            ),
        )
        # Only the enclave holds its ends: when it exits, our doorbell sees end-of-file.
        os.close(to_enclave[0])
        os.close(to_host[1])
        self._watcher = asyncio.create_task(self._watch(self._proc), name="km-enclave-watch")
        try:
            self.mode = await asyncio.wait_for(asyncio.shield(self._started), START_TIMEOUT)
        except TimeoutError:
            raise EnclaveExited(f"the KM enclave did not start within {START_TIMEOUT:g}s") from None
        return self.mode

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        reason = self.stop_reason or f"the KM enclave process exited with code {code}"
        if self.circuit is not None:
            self.circuit.abandon(reason)
        if self._started is not None and not self._started.done():
            self._started.set_exception(EnclaveExited(reason))
        if not self.stopped.is_set():
            self.exit_code = self.exit_code or code or 1
            self.stop_reason = reason
            self.stopped.set()

    # --- from the enclave -----------------------------------------------------------------------

    def _notice(self, notice: Notice) -> None:
        if self.sockets.on_notice(notice):
            return
        if isinstance(notice, DiskOp):
            if self.disks is not None:
                self.disks.on_notice(notice)
            return
        if self.disks is not None and self.disks.busy and isinstance(notice, Data | Closed):
            # The enclave sent it after a write it depends on: it leaves after that write.
            self.disks.after_writes(partial(self.sockets.on_notice, notice))
            return
        if isinstance(notice, Started):
            if self._started is not None and not self._started.done():
                self._started.set_result(notice.mode)
        elif isinstance(notice, Stopping):
            self.exit_code, self.stop_reason = notice.exit_code, notice.reason
            if self._started is not None and not self._started.done():
                self._started.set_exception(EnclaveExited(notice.reason))
            self.stopped.set()
        self.on_notice(notice)

    async def _on_request(self, request: Request) -> Reply:
        """What the enclave asks of the host: the I/O of its peer connections and files."""
        if isinstance(request, DiskBarrier | DiskList | DiskRead) and self.disks is not None:
            return await self.disks.serve(request)
        if isinstance(request, Listen):
            return await self.sockets.listen(request)
        if isinstance(request, Connect):
            return await self.sockets.connect(request)
        raise Failed.of("bad_request", f"the host does not serve {type(request).__name__}")

    def _tick(self) -> None:
        if self.circuit is not None and not self.circuit.closed.is_set():
            self.circuit.notify(Tick())

    def _to_enclave(self, notice: Notice) -> None:
        if self.circuit is not None:
            self.circuit.notify(notice)

    # --- to the enclave -----------------------------------------------------------------------

    async def call(self, request: Request, reply_type: type[R], timeout: float = 70.0) -> R:
        """Ask the enclave; ``Failed`` carries its refusal, ``CircuitClosed`` if it is gone."""
        if self.circuit is None:
            raise CircuitClosed("the KM enclave has not started")
        return await self.circuit.call(request, reply_type, timeout)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        proc = self._proc
        if proc is not None and proc.returncode is None and self.circuit is not None:
            with contextlib.suppress(Failed, CircuitClosed, TimeoutError):
                await self.circuit.call(StopRequest(), Ack, timeout=5.0)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                log.error("%s: the KM enclave did not stop; killing it", self.name)
                proc.kill()
                await proc.wait()
        await self.sockets.stop()
        if self.disks is not None:
            await self.disks.close()
        if self.circuit is not None:
            await self.circuit.close()
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        for ring in self._rings:
            ring.close()  # closes our memfd: the memory goes when the enclave closes its own
        self._rings = []
        for fd in self._bells:
            os.close(fd)
        self._bells = []
