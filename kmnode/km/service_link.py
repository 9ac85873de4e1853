"""The KM enclave process's side of the service enclave: its child process and pipe.

The KM enclave process starts the service enclave (a child of its own: they are the node's
two enclaves and talk directly, as local attestation on one platform does) and exchanges typed
messages with it over the child's stdin and stdout (``kmnode.service_pipe``): challenges,
reports, boxed keys, proofs; nothing secret in clear. The service enclave writes its output
into a shared-memory ring that the *host* created and drains (``kmnode.host.service_output``);
this side only passes its descriptors on, the ring's sealed memfd and the ring-control socket
(to every service process it starts). A crashed service enclave is restarted on the next
request; it then holds no keys until re-provisioned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TypeVar

from consensus.deadlines import Deadlines
from kmnode.procfs import stat_fields
from kmnode.service_pipe import (
    MAX_LINE,
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
    RingHandoff,
    ServiceUnavailable,
    decode_reply,
    encode,
    line_id,
)

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 10.0
R = TypeVar("R", bound=Reply)


class ServiceRefused(ServiceUnavailable):
    """The service enclave answered, and refused the request (its reason says why): it is up,
    but will not do this (a key it holds with other bytes, a key it does not hold)."""


def _no_answer() -> TimeoutError:
    return TimeoutError(f"no reply within {REQUEST_TIMEOUT}s")


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc, or None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def kill_child(pid: int) -> bool:
    """SIGKILL ``pid`` if it is a child of this process (never anything else); True if sent.

    The parent check is what makes a stale pid harmless: a recycled pid would not be our child.
    """
    if parent_of(pid) != os.getpid():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def crash_child(pid: int | None) -> int | None:
    """SIGKILL our child ``pid`` (chaos); the pid if it was killed, else None."""
    return pid if pid is not None and kill_child(pid) else None


class ServiceLink:
    def __init__(
        self,
        config_path: Path,
        node: str,
        ring: RingHandoff,
        log_path: Path | None = None,
        contract_store: str = "",
    ) -> None:
        #: The host's contract store (abstract socket address, hex), for the service.
        self.contract_store = contract_store
        self.config_path = config_path
        self.node = node
        #: The host's ring the service enclave writes its output into, and its control socket.
        self.ring = ring
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
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
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def crash(self) -> int | None:
        """Chaos: SIGKILL the service enclave; its pid, or None if it was not running."""
        return crash_child(self.pid if self.running else None)

    async def start(self) -> None:
        try:
            await self._spawn()
        finally:
            self._started.set()

    async def _spawn(self) -> None:
        """Start the child. Its log lines go to ``log_path``, or (None: in a node) where this
        process's go, the node's log, which the host holds: the KM enclave opens no file."""
        with contextlib.ExitStack() as files:
            stderr = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                stderr = files.enter_context(open(self.log_path, "ab"))
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kmnode.service.process",
                "--config",
                str(self.config_path),
                "--node",
                self.node,
                "--ring-fd",
                str(self.ring.ring_fd),
                "--ring-control",
                str(self.ring.control_fd),
                "--contract-store",
                self.contract_store,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                pass_fds=self.ring.fds,
                limit=MAX_LINE,
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
            raise ServiceRefused(reply.error or "unknown error")
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
        self._deadlines.close()
