"""The host's side of the service enclave: its child process, and the ring it writes.

The host creates the shared-memory ring, starts the service enclave with the ring's name, relays
requests to it as JSON lines (challenges, reports, ciphertext: nothing secret in clear), and
drains the ring on its event loop, handing each output record to a callback (MQTT). A crashed
service enclave is restarted on the next request; it then holds no keys until re-provisioned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from consensus.deadlines import Deadlines
from kmnode.host.faults import RingStall
from kmnode.ring import AsyncReader, RingClosed, RingError
from kmnode.ring import Ring as SharedRing
from kmnode.service_pipe import (
    ChallengeReply,
    ChallengeRequest,
    IdentityReply,
    IdentityRequest,
    KeyReply,
    KeyRequest,
    ModulesReply,
    ModulesRequest,
    PipeError,
    PipeMessage,
    ProveReply,
    ProveRequest,
    Reply,
    ServiceUnavailable,
    decode_reply,
    encode,
    line_id,
)

log = logging.getLogger(__name__)
RING_CAPACITY = 1 << 20
REQUEST_TIMEOUT = 10.0
R = TypeVar("R", bound=Reply)


def _no_answer() -> TimeoutError:
    return TimeoutError(f"no reply within {REQUEST_TIMEOUT}s")


def remove_stale_rings(node: str) -> None:
    """Unlink rings left by earlier runs of ``node`` that were killed (SIGKILL skips cleanup),
    so shared memory does not leak across restarts. Every ring of a node is named
    ``kmsim-{node}-...-{pid of its host}``."""
    for path in Path("/dev/shm").glob(f"kmsim-{node}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                path.unlink()


class ServiceLink:
    def __init__(
        self,
        config_path: Path,
        node: str,
        on_output: Callable[[bytes], None],
        log_path: Path,
        stall: RingStall | None = None,
    ) -> None:
        self.config_path = config_path
        self.node = node
        self.on_output = on_output
        self.log_path = log_path
        self.stall = stall
        self.ring_name = f"/kmsim-{node}-{os.getpid()}"
        self._ring: SharedRing | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._drain_task: asyncio.Task[None] | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0
        #: Requests (id, line) queued for the next write, and the process they are for.
        self._outbox: list[tuple[int, bytes]] = []
        self._outbox_proc: asyncio.subprocess.Process | None = None
        self._started = asyncio.Event()
        #: Request timeouts (one timer for all: see ``consensus.deadlines``).
        self._deadlines = Deadlines()
        self.measurement = ""
        self.outputs = 0
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        remove_stale_rings(self.node)
        self._ring = SharedRing.create(self.ring_name, RING_CAPACITY)
        self._drain_task = asyncio.create_task(self._drain(self._ring), name="service-drain")
        try:
            await self._spawn()
        finally:
            self._started.set()

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kmnode.service.process",
                "--config",
                str(self.config_path),
                "--node",
                self.node,
                "--ring",
                self.ring_name,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        self._reply_task = asyncio.create_task(self._read_replies(self._proc), name="service-rx")
        reply = await self._exchange(IdentityRequest(), IdentityReply)
        self.measurement = reply.measurement

    # --- the requests, typed ------------------------------------------------------------------

    async def challenge(self, km_measurement: bytes, challenge: bytes) -> bytes:
        """Local attestation: the service's report for ``challenge``."""
        request = ChallengeRequest(km_measurement=km_measurement.hex(), challenge=challenge.hex())
        return bytes.fromhex((await self.request(request, ChallengeReply)).response)

    async def provide_key(self, ciphertext: bytes, vouch: bytes) -> tuple[str, int]:
        """Hand over a boxed key and the KM enclave's vouch for it; the service's (name,
        generation) of what it accepted."""
        request = KeyRequest(ciphertext=ciphertext.hex(), vouch=vouch.hex())
        reply = await self.request(request, KeyReply)
        return reply.key, reply.generation

    async def prove(self, key: str, generation: int, challenge: bytes) -> str:
        """The proof workload's MAC of ``challenge`` under a provisioned key."""
        request = ProveRequest(key=key, generation=generation, challenge=challenge.hex())
        return (await self.request(request, ProveReply)).mac

    async def modules(self) -> list[str]:
        """The project modules the service process has loaded."""
        return (await self.request(ModulesRequest(), ModulesReply)).modules

    async def request(self, request: PipeMessage, reply_type: type[R]) -> R:
        """One request/response with the service enclave, restarting it if it died.

        Requests are pipelined: many may be outstanding, each matched to its reply by id, so a
        slow release never makes the others queue behind a lock (and a reply that arrives after
        its request timed out is recognised and dropped, never given to the next caller). The
        requests made in one turn of the event loop (say, the challenges for every release of
        an applied batch) leave in one write, and the service answers them in one write.
        """
        if not self._started.is_set():
            try:
                await asyncio.wait_for(self._started.wait(), REQUEST_TIMEOUT)
            except TimeoutError:
                raise ServiceUnavailable("service enclave did not start") from None
        if not self.running:
            async with self._lock:
                if not self.running:
                    self.restarts += 1
                    log.warning("%s: service enclave not running; restarting it", self.node)
                    await self._spawn()
        return await self._exchange(request, reply_type)

    async def _exchange(self, request: PipeMessage, reply_type: type[R]) -> R:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise ServiceUnavailable("service enclave is not running")
        if self._reply_task is None or self._reply_task.done():
            raise ServiceUnavailable("service enclave exited")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            line = encode(request.model_copy(update={"id": request_id}))
            self._queue_line(proc, request_id, line)
            self._deadlines.watch(future, REQUEST_TIMEOUT, _no_answer)
            reply = decode_reply(await future, reply_type)
        except (OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"service enclave did not answer: {exc!r}") from None
        except PipeError as exc:
            raise ServiceUnavailable(f"service enclave answered nonsense: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise ServiceUnavailable(reply.error or "unknown error")
        return reply

    def _queue_line(self, proc: asyncio.subprocess.Process, request_id: int, line: bytes) -> None:
        """Queue a request line; the queue is written once, at the end of this loop turn."""
        if self._outbox and self._outbox_proc is not proc:
            self._flush()  # lines for a process that was replaced meanwhile go to it first
        if not self._outbox:
            self._outbox_proc = proc
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((request_id, line))

    def _flush(self) -> None:
        queued, self._outbox = self._outbox, []
        proc, self._outbox_proc = self._outbox_proc, None
        if not queued or proc is None:
            return
        try:
            if proc.stdin is None or proc.stdin.is_closing():
                raise ConnectionResetError("its stdin is closed")
            proc.stdin.write(b"".join(line for _, line in queued))
        except OSError as exc:
            for request_id, _ in queued:
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_exception(ServiceUnavailable(f"cannot write to it: {exc}"))

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                reply_to = line_id(line)
                if reply_to is None:
                    log.warning("%s: unreadable reply from the service enclave", self.node)
                    continue
                future = self._pending.get(reply_to)
                if future is not None and not future.done():
                    future.set_result(line)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ServiceUnavailable("service enclave exited"))

    async def _drain(self, ring: SharedRing) -> None:
        reader = AsyncReader(ring)
        try:
            while True:
                if self.stall is not None:
                    await self.stall.wait_running()
                for record in await reader.read_batch():
                    self.outputs += 1
                    self.on_output(record)
        except (RingClosed, asyncio.CancelledError):
            pass
        except RingError as exc:
            log.error("%s: service ring failed: %s", self.node, exc)
        finally:
            reader.close()

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reply_task is not None:
            self._reply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply_task
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        if self._ring is not None:
            self._ring.close()  # the creator's close also unlinks the name
        self._deadlines.close()
