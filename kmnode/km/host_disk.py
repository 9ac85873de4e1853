"""The KM enclave's files, held by the host: a deferred ``consensus.disk.Disk`` over the circuit.

The enclave decides every byte (records tagged under its log key, sealed blobs) and the host
only writes, fsyncs and reads back, in the order asked: each operation is a ``DiskOp`` notice,
and ``durable`` is a ``DiskBarrier`` request the host answers once everything before it is
done. That is the "persisted up to" of a CCF-style host: Raft acknowledges an entry only after
the barrier that follows its write returns. One queue on the host serves both areas (the Raft
directory and the node directory), so a barrier also covers a sealed blob written before it.

What comes back is not trusted: the log authenticates every record and snapshot, and the
enclave unseals its state, so a file the host changed, swapped or took from elsewhere is
refused when read (``TamperedLogError``, ``SealingError``). Reads block the calling thread on
the event loop's circuit, so they are made off the loop (the log is opened in a worker thread);
writes may come from any thread and keep their order per thread.
"""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from pathlib import Path
from typing import TypeVar

from consensus.disk import DiskError, check_name
from kmnode.circuit import Circuit, CircuitClosed
from kmnode.km_messages import (
    MAX_DISK_CHUNK,
    DiskArea,
    DiskBarrier,
    DiskData,
    DiskList,
    DiskListing,
    DiskOp,
    DiskOpKind,
    DiskRead,
    Failed,
    Failure,
    Reply,
)

#: How long a read or barrier may take before the enclave gives up on its host (an fsync on a
#: sick disk can take seconds; a host that never answers must not stall the node silently).
DISK_TIMEOUT = 120.0
#: Largest file the enclave reads back (a host that keeps sending is refused, not buffered).
MAX_FILE_BYTES = 1 << 30
R = TypeVar("R", bound=Reply)


class HostDisk:
    """One of the node's directories, as the host holds it (see the module docstring)."""

    deferred = True

    def __init__(
        self, circuit: Circuit, area: DiskArea, path: Path, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._circuit = circuit
        self.area: DiskArea = area
        #: Where the host keeps it (for messages only; this process never opens it).
        self.path = path
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # --- writes: queued in order ----------------------------------------------------------------

    def _send(self, op: DiskOp) -> None:
        if threading.get_ident() == self._loop_thread:
            self._circuit.notify(op)
        else:
            self._loop.call_soon_threadsafe(self._circuit.notify, op)

    def _op(
        self, kind: DiskOpKind, name: str, data: bytes = b"", *, size: int = 0, sync: bool = False
    ) -> None:
        name = check_name(name)
        self._send(DiskOp(area=self.area, kind=kind, name=name, data=data, size=size, sync=sync))

    def append(self, name: str, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_DISK_CHUNK):
            self._op("append", name, bytes(view[start : start + MAX_DISK_CHUNK]))

    def truncate(self, name: str, size: int) -> None:
        self._op("truncate", name, size=size)

    def replace(self, name: str, data: bytes, *, sync: bool) -> None:
        view = memoryview(data)
        last = max(0, len(view) - MAX_DISK_CHUNK)
        for start in range(0, last, MAX_DISK_CHUNK):
            self._op("stage", name, bytes(view[start : min(start + MAX_DISK_CHUNK, last)]))
        self._op("replace", name, bytes(view[last:]), sync=sync)

    def delete(self, name: str) -> None:
        self._op("delete", name)

    def sync(self, name: str) -> None:
        self._op("sync", name)

    def sync_dir(self) -> None:
        self._op("sync_dir", "dir")  # the name is unused

    def durable(self) -> asyncio.Future[None]:
        """The barrier leaves now, in the loop turn of the writes it follows (one doorbell for
        both); the future is settled from the host's answer."""
        done: asyncio.Future[None] = self._loop.create_future()
        try:
            reply = self._circuit.request(DiskBarrier(), DISK_TIMEOUT)
        except CircuitClosed as exc:
            done.set_exception(DiskError(f"the host did not confirm a write: {exc!r}"))
            return done
        reply.add_done_callback(partial(_settle, done))
        return done

    # --- reads: block this (worker) thread ---------------------------------------------------

    def _blocking(self, request: DiskList | DiskRead, reply: type[R]) -> R:
        if threading.get_ident() == self._loop_thread:
            raise DiskError("a host disk is read off the event loop (open the log in a thread)")
        call = self._circuit.call(request, reply, DISK_TIMEOUT)
        try:
            return asyncio.run_coroutine_threadsafe(call, self._loop).result(DISK_TIMEOUT + 5)
        except Failed as exc:
            raise DiskError(f"the host could not read {self.area}: {exc}") from None
        except (CircuitClosed, TimeoutError) as exc:
            raise DiskError(f"the host did not answer a read: {exc!r}") from None

    def listing(self) -> dict[str, int]:
        return dict(self._blocking(DiskList(area=self.area), DiskListing).files)

    def read(self, name: str) -> bytes:
        chunks: list[bytes] = []
        offset = 0
        while True:
            request = DiskRead(
                area=self.area, name=check_name(name), offset=offset, length=MAX_DISK_CHUNK
            )
            data = self._blocking(request, DiskData).data
            chunks.append(data)
            offset += len(data)
            if offset > MAX_FILE_BYTES:
                raise DiskError(f"{self.area}/{name} is larger than {MAX_FILE_BYTES} bytes")
            if len(data) < MAX_DISK_CHUNK:
                return b"".join(chunks)

    def close(self) -> None:
        return None


def _settle(done: asyncio.Future[None], reply: asyncio.Future[Reply]) -> None:
    if done.done():
        return
    if reply.cancelled():
        done.cancel()
        return
    exc = reply.exception()
    if exc is not None:
        done.set_exception(DiskError(f"the host did not confirm a write: {exc!r}"))
    elif isinstance(answer := reply.result(), Failure):
        done.set_exception(
            DiskError(f"the host could not store the enclave's files: {Failed(answer)}")
        )
    else:
        done.set_result(None)
