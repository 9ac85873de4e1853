"""The Ready loop every driver of a ``RaftCore`` shares: the asyncio driver of the nodes and the
benchmarks, the deterministic simulator, and the synchronous test harness.

A driver takes one ``Ready`` at a time and carries it out in a fixed order: send what may leave
before the write, write (and, if ``must_sync``, make it durable), send the rest, apply the
committed entries, and ``advance``. What differs between drivers is only how they write and
wait (an fsync inline or in a thread, a host's barrier, a simulated delay); when messages may
leave is decided here, once, from what the core put in the Ready (``send_first``,
``must_sync``) and what the driver's I/O guarantees:

* ``BEFORE_WRITE``: a leader that led before and after the Ready pipelines its appends
  (``Ready.send_first``), so followers write in parallel with it;
* ``AFTER_WRITE``: the writes and the sends go through one ordered channel whose far end
  performs each write before any send queued after it (a KM enclave's host holding both its
  files and its sockets), so they may be queued right behind the writes;
* ``AFTER_DURABLE``: otherwise, and always for a node that must not acknowledge what it has not
  stored, the messages leave once the write is durable.

While a Ready is in flight (``inflight``) ``next`` returns nothing: inputs keep queueing in the
core and the next Ready carries them all (group commit).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from consensus.raft import RaftCore
from consensus.types import Ready


class SendAt(enum.Enum):
    BEFORE_WRITE = "before_write"
    AFTER_WRITE = "after_write"
    AFTER_DURABLE = "after_durable"


@dataclass(slots=True)
class Step:
    """One Ready and when its messages leave (see the module docstring)."""

    ready: Ready
    send_at: SendAt
    #: Whether the messages have been sent (``sent`` by the driver when it sends them).
    sent: bool = False


class ReadyLoop:
    """One Ready at a time, in the order the module docstring gives.

    ``pipeline``: a leader may send before its own write (off in simulator runs that check
    the plain order). ``ordered_io``: the driver's writes and sends share an ordered channel
    (``SendAt.AFTER_WRITE``).
    """

    def __init__(self, core: RaftCore, *, pipeline: bool = True, ordered_io: bool = False) -> None:
        self.core = core
        self.pipeline = pipeline
        self.ordered_io = ordered_io
        #: The Ready being carried out (between ``next`` and ``advance``).
        self.inflight: Step | None = None

    def next(self) -> Step | None:
        """The next Ready to carry out, or None if one is in flight or the core is quiet."""
        if self.inflight is not None or not self.core.has_ready():
            return None
        rd = self.core.ready()
        if self.pipeline and rd.send_first:
            send_at = SendAt.BEFORE_WRITE
        elif self.ordered_io and rd.must_sync:
            send_at = SendAt.AFTER_WRITE
        else:
            send_at = SendAt.AFTER_DURABLE
        self.inflight = Step(rd, send_at)
        return self.inflight

    def advance(self, step: Step) -> None:
        """The Ready is durable, sent and applied: tell the core, and allow the next one."""
        assert step is self.inflight, "advance the Ready in flight, once"
        self.inflight = None
        self.core.advance(step.ready)

    def drop(self) -> None:
        """Forget the Ready in flight without advancing (the node crashed or stopped)."""
        self.inflight = None
