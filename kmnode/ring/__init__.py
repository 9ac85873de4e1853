"""Shared-memory ring buffer carrying the service TEE's output to the untrusted host.

The TEE side appends to a `Ring` with a `Writer`; the host side drains it with a `Reader` (or
an `AsyncReader` on its event loop).  The service enclave's output ring is a sealed memfd: the
host makes it with `Ring.create_sealed` and hands its descriptor to the TEE process, which
maps it with `Ring.attach_sealed` only if the seals forbid resizing it (a shrunk mapping would
SIGBUS the TEE).  Rings by name (`Ring.create`, `Ring.attach`) serve benchmarks and tests.
`OcallWriter` models the other variant of the seeds, where every record costs a world switch
to the host which then writes it.  See `kmnode/ring/_ring.pyx` for the memory layout and why
each side validates what it reads.

    ring = Ring.create_sealed(1 << 20)                 # host: pass ring.fileno() to the TEE
    tee_ring = Ring.attach_sealed(fd, 1 << 20)         # TEE: refuses an unsealed descriptor
    ring = Ring.create("svc-out", 1 << 20)             # or by name; the creator unlinks it
    tee = Writer(ring, on_full=OnFull.WAIT, timeout=1.0)
    tee.write(b"record", type=1)                       # or write_batch([...])

    host = Reader(Ring.attach("svc-out"))              # any process, by name
    host.read(timeout=None)                            # blocks on a futex, no polling
    host.read_batch(256)
    with host.views() as records:                      # zero-copy (type, memoryview) pairs
        ...
"""

from __future__ import annotations

from enum import IntEnum

from kmnode.ring.errors import (
    RecordTooLarge,
    RingClosed,
    RingCorrupted,
    RingError,
    RingFull,
    RingLockTimeout,
    RingNotSealed,
)

# The extension imports kmnode.ring.errors, so it must come after it.
from kmnode.ring import _ring  # isort: skip
from kmnode.ring._ring import (
    FRAME_SIZE,
    HEADER_SIZE,
    LAYOUT,
    Reader,
    Ring,
    ViewBatch,
    Writer,
    record_size,
)


class OnFull(IntEnum):
    """What a writer does when a record does not fit in the free bytes."""

    WAIT = _ring.WAIT
    """Sleep until the reader frees space, up to the timeout, then raise RingFull."""
    DISCARD = _ring.DISCARD
    """Drop the record, count it at the header's fourth address, return False."""
    FAIL = _ring.FAIL
    """Raise RingFull at once."""


from kmnode.ring.aio import AsyncReader  # noqa: E402  (needs Reader above)
from kmnode.ring.ocall import OcallWriter  # noqa: E402

__all__ = [
    "FRAME_SIZE",
    "HEADER_SIZE",
    "LAYOUT",
    "AsyncReader",
    "OcallWriter",
    "OnFull",
    "Reader",
    "RecordTooLarge",
    "Ring",
    "RingClosed",
    "RingCorrupted",
    "RingError",
    "RingFull",
    "RingLockTimeout",
    "RingNotSealed",
    "ViewBatch",
    "Writer",
    "record_size",
]
