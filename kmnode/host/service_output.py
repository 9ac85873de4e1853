"""The service enclave's output ring, on the host: created here, drained onto MQTT.

The service enclave writes records (proofs, workload output) into a shared-memory ring; the
host owns that memory (it creates the ring and unlinks it), drains it on its event loop and
hands each record to a callback (MQTT). The service enclave itself is a child of the KM
enclave process, which passes it this ring's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from kmnode.host.faults import RingStall
from kmnode.ring import AsyncReader, Ring, RingClosed, RingError

log = logging.getLogger(__name__)
RING_CAPACITY = 1 << 20


def remove_stale_rings(node: str) -> None:
    """Unlink rings left by earlier runs of ``node`` that were killed (SIGKILL skips cleanup),
    so shared memory does not leak across restarts. Every ring of a node is named
    ``kmsim-{node}-...-{pid of its host}``."""
    for path in Path("/dev/shm").glob(f"kmsim-{node}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                path.unlink()


class ServiceOutput:
    def __init__(
        self, node: str, on_output: Callable[[bytes], None], stall: RingStall | None = None
    ) -> None:
        self.node = node
        self.on_output = on_output
        self.stall = stall
        self.ring_name = f"/kmsim-{node}-{os.getpid()}"
        self._ring: Ring | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.outputs = 0

    def start(self) -> None:
        remove_stale_rings(self.node)
        self._ring = Ring.create(self.ring_name, RING_CAPACITY)
        self._drain_task = asyncio.create_task(self._drain(self._ring), name="service-drain")

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
            log.error("%s: service ring failed: %s", self.node, exc)
        finally:
            reader.close()

    async def stop(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        if self._ring is not None:
            self._ring.close()  # the creator's close also unlinks the name
            self._ring = None
