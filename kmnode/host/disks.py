"""The host's side of the KM enclave's storage: the node's files, written as the enclave asks.

The enclave sends file operations in order (``DiskOp``) and asks for a barrier when it needs
them durable (``kmnode.km.host_disk``). Every operation of both areas runs in order on one
worker thread (writes and fsyncs must not stall the event loop that moves peer bytes), so a
barrier answered means everything before it is done. After a failed operation the rest are not
attempted: the barrier reports the first failure, and the enclave stops rather than go on with a
log that has a hole in it. Names are checked (``consensus.disk.check_name``): the enclave can
only touch the files of its own two directories.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from consensus.disk import LocalDisk
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

    def on_notice(self, op: DiskOp) -> None:
        self._executor.submit(self._apply, op)

    def _apply(self, op: DiskOp) -> None:
        if self._failed is not None:
            return
        disk = self._disks[op.area]
        try:
            if op.kind == "append":
                disk.append(op.name, op.data)
            elif op.kind == "sync":
                disk.sync(op.name)
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
