"""The host's side of the KM enclave's storage: the node's files, written as the enclave asks.

The enclave sends file operations in order (``DiskOp``) and asks for a barrier when it needs
them durable (``kmnode.km.host_disk``). Operations of both areas run in order: on the event
loop while fsyncs are fast (a hand-off to a thread and back costs more than a 0.1 ms fsync, on
the latency path of every commit), on one worker thread while they are slow (a 10 ms fsync
must not stall the loop that moves peer bytes) or while that thread still has work, so a
barrier answered means everything before it is done. After a failed operation the rest are not
attempted: the barrier reports the first failure, and the enclave stops rather than go on with a
log that has a hole in it. Names are checked (``consensus.disk.check_name``): the enclave can
only touch the files of its own two directories.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from consensus.disk import LocalDisk
from kmnode.histogram import Histogram
from kmnode.km_messages import (
    Ack,
    DiskArea,
    DiskBarrier,
    DiskData,
    DiskList,
    DiskListing,
    DiskOp,
    DiskRead,
    Failed,
    Reply,
)

log = logging.getLogger(__name__)

#: Do operations on the event loop while recent fsyncs (a moving average) took less than this.
INLINE_FSYNC_S = 0.002


class HostDisks:
    """The Raft directory and the node directory of one node, for its enclave."""

    def __init__(self, node_dir: Path, raft_dir: Path) -> None:
        self._disks: dict[DiskArea, LocalDisk] = {
            "node": LocalDisk(node_dir),
            "raft": LocalDisk(raft_dir),
        }
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="host-disk")
        #: The first operation that failed (nothing after it is done).
        self._failed: str | None = None
        #: A large ``replace`` arrives in pieces: the leading ones, per file.
        self._staged: dict[tuple[DiskArea, str], bytearray] = {}
        #: Operations (and sends waiting for them) handed to the thread whose completion the
        #: loop has not yet seen. While any are, later ones follow them there, so the order
        #: holds. Only the event loop reads or changes it.
        self._queued = 0
        #: Moving average of an fsync's duration; starts pessimistic (the thread).
        self.fsync_avg_s = 0.01
        #: Every fsync's duration, for ``/metrics`` (a worker thread observes; a scrape reads:
        #: a count read mid-update is off by one at worst).
        self.fsyncs = Histogram()

    def on_notice(self, op: DiskOp) -> None:
        large = op.kind == "stage" or (op.kind == "replace" and (op.area, op.name) in self._staged)
        if self._queued == 0 and self.fsync_avg_s < INLINE_FSYNC_S and not large:
            self._apply(op)
        else:
            self._queue(partial(self._apply, op))

    @property
    def busy(self) -> bool:
        """Whether operations are still in the thread (a send must then wait for them)."""
        return self._queued > 0

    def after_writes(self, send: Callable[[], object]) -> None:
        """Run ``send`` once every operation received before it is done: the enclave may then
        send a message right after the write it depends on (a follower's acknowledgement after
        its fsync) without waiting for the barrier's answer."""
        if self._queued == 0:
            send()
        else:
            self._queue(_nothing, then=send)

    def _queue(self, work: Callable[[], None], then: Callable[[], object] | None = None) -> None:
        self._queued += 1
        done = asyncio.get_running_loop().run_in_executor(self._executor, work)
        done.add_done_callback(partial(self._dequeued, then))

    def _dequeued(self, then: Callable[[], object] | None, _: object) -> None:
        self._queued -= 1
        if then is not None:
            then()

    def _sync(self, disk: LocalDisk, name: str) -> None:
        start = time.perf_counter()
        disk.sync(name)
        took = time.perf_counter() - start
        self.fsync_avg_s += (took - self.fsync_avg_s) * 0.2
        self.fsyncs.observe(took)

    def _apply(self, op: DiskOp) -> None:
        if self._failed is not None:
            return
        disk = self._disks[op.area]
        try:
            if op.kind == "append":
                disk.append(op.name, op.data)
            elif op.kind == "sync":
                self._sync(disk, op.name)
            elif op.kind == "stage":
                self._staged.setdefault((op.area, op.name), bytearray()).extend(op.data)
            elif op.kind == "replace":
                staged = self._staged.pop((op.area, op.name), bytearray())
                disk.replace(op.name, bytes(staged + op.data), sync=op.sync)
            elif op.kind == "truncate":
                disk.truncate(op.name, op.size)
            elif op.kind == "delete":
                disk.delete(op.name)
            else:
                disk.sync_dir()
        except Exception as exc:  # whatever it was, nothing after it may be written
            self._failed = f"{op.kind} {op.area}/{op.name}: {exc}"
            log.error("storing the enclave's files failed: %s", self._failed)

    async def serve(self, request: DiskBarrier | DiskList | DiskRead) -> Reply:
        loop = asyncio.get_running_loop()
        if isinstance(request, DiskBarrier):
            if self._queued:
                await loop.run_in_executor(self._executor, lambda: None)
            if self._failed is not None:
                raise Failed.of("internal", f"disk: {self._failed}")
            return Ack()
        disk = self._disks[request.area]
        try:
            if isinstance(request, DiskList):
                return DiskListing(files=await loop.run_in_executor(self._executor, disk.listing))
            data = await loop.run_in_executor(
                self._executor, disk.read_at, request.name, request.offset, request.length
            )
        except FileNotFoundError:
            raise Failed.of("not_found", f"no such file in {request.area}") from None
        except OSError as exc:
            raise Failed.of("internal", f"disk: {exc}") from None
        return DiskData(data=data)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        for disk in self._disks.values():
            disk.close()


def _nothing() -> None:
    return None
