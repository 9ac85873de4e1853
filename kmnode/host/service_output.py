"""The service enclave's output ring, on the host: created here, drained onto MQTT.

The service enclave writes records (proofs, workload output) into a shared-memory ring; the
host creates that memory, drains it on its event loop and hands each record to a callback
(MQTT). The ring is a sealed memfd (``Ring.create_sealed``), so nobody, this host included, can
shrink it under the enclave: its descriptor, and the service's end of a ring-control socket,
are handed to the KM enclave process at spawn, which passes both on to the service enclave it
starts (``handoff``).

Over the ring-control socket the service asks for the current ring (``RingRequest``): at start,
and when its ring failed, naming the error. A reported failure of the current ring is logged,
published (``on_ring_failed``), and answered with a fresh sealed ring, which this side drains
from then on; the service enclave process, with its keys, carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from kmnode.host.faults import RingStall
from kmnode.ring import AsyncReader, Reader, Ring, RingClosed, RingError
from kmnode.service_pipe import (
    MAX_RING_MESSAGE,
    SERVICE_RING_CAPACITY,
    PipeError,
    RingGrant,
    RingHandoff,
    RingRequest,
    decode_ring_message,
    encode,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RingFailure:
    """A ring failure the service enclave reported, and what the host did about it."""

    error: str
    replaced: bool
    #: How many rings were replaced so far (this one included).
    replacements: int


class ServiceOutput:
    def __init__(
        self,
        node: str,
        on_output: Callable[[bytes], None],
        stall: RingStall | None = None,
        on_ring_failed: Callable[[RingFailure], None] | None = None,
    ) -> None:
        self.node = node
        self.on_output = on_output
        self.stall = stall
        self.on_ring_failed = on_ring_failed
        self._ring: Ring | None = None
        self._inode = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._control: socket.socket | None = None
        self._theirs: socket.socket | None = None
        self._control_task: asyncio.Task[None] | None = None
        self.outputs = 0
        self.replacements = 0

    @property
    def ring(self) -> Ring | None:
        """The current ring (for its fill and discard counts in ``/metrics``)."""
        return self._ring

    @property
    def handoff(self) -> RingHandoff:
        """What to pass (``pass_fds``) to the process that starts the service enclave."""
        if self._ring is None or self._theirs is None:
            raise RuntimeError("the service output is not started")
        return RingHandoff(self._ring.fileno(), self._theirs.fileno())

    @property
    def ring_inode(self) -> int:
        """The current ring's memfd inode (what the service names it by)."""
        return self._inode

    def start(self) -> None:
        self._control, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control.setblocking(False)
        self._install(self._new_ring())
        self._control_task = asyncio.create_task(self._serve_control(), name="service-ring-ctl")

    def _new_ring(self) -> Ring:
        return Ring.create_sealed(SERVICE_RING_CAPACITY, label=f"kmsim-{self.node}-service")

    def _install(self, ring: Ring) -> None:
        self._ring, self._inode = ring, os.fstat(ring.fileno()).st_ino
        self._drain_task = asyncio.create_task(self._drain(ring), name="service-drain")

    async def _drain(self, ring: Ring) -> None:
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
            # The service enclave meets the same state on its next write and asks for a new
            # ring; until then there is nothing this side can trust in this one.
            log.error("%s: service ring failed: %s", self.node, exc)
        finally:
            reader.close()

    async def _serve_control(self) -> None:
        """Answer the service enclave's ring requests until stopped."""
        assert self._control is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._control, MAX_RING_MESSAGE + 1)
            if not data:
                return
            try:
                request = decode_ring_message(data, RingRequest)
            except PipeError as exc:
                log.warning("%s: ignored a ring-control message: %s", self.node, exc)
                continue
            if request.error:
                await self._on_failure(request)
            self._grant(request)

    async def _on_failure(self, request: RingRequest) -> None:
        """Replace the ring the service reports failed, if it is the current one (a report
        about a ring already replaced, or the service holding none, gets the current one)."""
        replace = request.ring == self._inode
        log.warning(
            "%s: the service enclave reports its output ring failed (%s)%s",
            self.node,
            request.error,
            "; replacing it" if replace else "",
        )
        if replace:
            await self._replace()
        if self.on_ring_failed is not None:
            self.on_ring_failed(RingFailure(request.error, replace, self.replacements))

    async def _replace(self) -> None:
        old, task = self._ring, self._drain_task
        self._install(self._new_ring())
        self.replacements += 1
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if old is not None:
            self._salvage(old)
            with contextlib.suppress(RingError, BufferError):
                old.close()

    def _salvage(self, ring: Ring) -> None:
        """Publish what the failed ring still holds readably (nothing, if its header lies)."""
        with contextlib.suppress(RingError):
            for record in Reader(ring, lock_timeout=0.1).read_batch():
                self.outputs += 1
                self.on_output(record)

    def _grant(self, request: RingRequest) -> None:
        if self._control is None or self._ring is None:
            return
        grant = encode(RingGrant(id=request.id, ring=self._inode))
        try:
            socket.send_fds(self._control, [grant], [self._ring.fileno()])
        except OSError as exc:  # the service is not reading: it asks again when it needs to
            log.warning("%s: could not hand the service its output ring: %r", self.node, exc)

    async def stop(self) -> None:
        for task in (self._control_task, self._drain_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._ring is not None:
            self._ring.close()  # closes the memfd: the memory goes when the enclaves unmap it
            self._ring = None
        for sock in (self._control, self._theirs):
            if sock is not None:
                sock.close()
        self._control = self._theirs = None
