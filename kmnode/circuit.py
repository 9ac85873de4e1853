"""The circuit between a node's host process and its KM enclave process: two rings, one each way.

CCF's host and enclave talk through a pair of ring buffers in shared memory; so do ours. The
host creates both rings (it owns the shared memory and unlinks it), the enclave process
attaches them by name. Every record is one message of ``kmnode.km_messages`` in one compact
encoding (msgpack).

Each direction also has a *doorbell*: a pipe whose read end the receiving side's event loop
watches. A side writes its records of one loop turn into the ring, then one byte into the
doorbell; the other side wakes in its selector, drains the doorbell and takes every record in
the ring. Measured on this machine, a request and its reply cost about 430 µs when each side
waited for the ring's futex on a worker thread (the ``AsyncReader`` way: two thread hand-offs
per crossing), against tens of µs with the doorbell (one wake-up per crossing, straight into the
loop). The doorbell carries no data, only "look now"; the ring stays the data path. It is also
how a side learns the other died: the doorbell's read end sees end-of-file when its last writer
is gone.

Two ways to cross, chosen in cluster.yaml (``enclave.circuit``):

* ``switchless`` (default): the enclave writes into the ring itself, as SGX's switchless calls
  and CCF do; a crossing costs a write and a futex wake.
* ``ocall``: every record the enclave sends costs a modelled world switch (EEXIT, the host
  writes it, ERESUME; ``kmnode.ring.ocall``), so the price of an enclave transition shows end
  to end in the release benchmark.

Requests carry an id the reply repeats; either side may ask (the host asks for operator work,
the enclave asks the host to relay to the service enclave) and either side may notify (events).
A side treats everything it reads as hostile: a record that does not decode to one of the
circuit's messages is dropped and counted, never raised into the loop.

A side never blocks on a full ring: what does not fit waits in a backlog, in order, and is
written as the other side reads. Both sides write in bursts (a snapshot going to the host's
disk while the host relays a catch-up to the enclave), and a writer that slept on a full ring
would stop reading its own, so two full rings would stop both processes until a timeout broke
the circuit. A backlog that makes no progress for ``WRITE_TIMEOUT``, or outgrows
``MAX_BACKLOG``, means the other side stopped reading: the circuit is abandoned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Literal, TypeVar

from kmnode.km_messages import (
    CircuitError,
    Failed,
    Failure,
    Message,
    Notice,
    Reply,
    Request,
    decode,
    encode,
)
from kmnode.ring import OcallWriter, OnFull, Reader, Ring, RingError, RingFull, Writer

log = logging.getLogger(__name__)

#: Bytes in each direction's ring: far above a burst of replies under load (a reply is ~100 B).
CIRCUIT_CAPACITY = 4 << 20
#: How long a backlog may wait for the reader to make room before the circuit counts as broken.
WRITE_TIMEOUT = 10.0
#: Most bytes waiting for room in the ring before the circuit counts as broken.
MAX_BACKLOG = 64 << 20
#: How often a side with a backlog looks for room (the reader does not signal it).
BACKLOG_RETRY_S = 0.001
CircuitMode = Literal["switchless", "ocall"]
R = TypeVar("R", bound=Reply)

RequestHandler = Callable[[Request], Awaitable[Reply]]
NoticeHandler = Callable[[Notice], None]


class CircuitClosed(CircuitError):
    """The other side is gone (its process exited or the rings were closed)."""


def _expire(future: asyncio.Future[Reply], request: Request) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no reply to {type(request).__name__}"))


class Circuit:
    """One side of the circuit: send requests and notices, answer the other side's requests."""

    def __init__(
        self,
        inbound: Ring,
        outbound: Ring,
        *,
        bell_in: int,
        bell_out: int,
        on_request: RequestHandler,
        on_notice: NoticeHandler,
        mode: CircuitMode = "switchless",
        name: str = "circuit",
    ) -> None:
        self.name = name
        self._inbound = inbound
        self._outbound = outbound
        self._reader = Reader(inbound)
        #: Doorbells: the read end of the other side's, and the write end of ours.
        self._bell_in = bell_in
        self._bell_out = bell_out
        self._ring_pending = False
        self._unrung = False
        writer = Writer(outbound, on_full=OnFull.FAIL)
        self._writer: Writer | OcallWriter = (
            OcallWriter.over(writer, on_full=OnFull.FAIL) if mode == "ocall" else writer
        )
        #: Records waiting for room in the ring, in order (see the module docstring).
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self._backlog_since = 0.0
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._on_request = on_request
        self._on_notice = on_notice
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watching = False
        self.closed = asyncio.Event()
        #: Records that did not decode (a hostile or broken other side), and records sent.
        self.malformed = 0
        self.sent = 0

    def start(self) -> None:
        os.set_blocking(self._bell_in, False)
        os.set_blocking(self._bell_out, False)
        asyncio.get_running_loop().add_reader(self._bell_in, self._on_bell)
        self._watching = True
        # Records written before we watched (the other side may have started first).
        self._take()

    async def close(self) -> None:
        self._unwatch()
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending()

    # --- sending ------------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self.send_raw(encode(message))

    def send_raw(self, record: bytes) -> None:
        """Write ``record`` as it is, not an encoded message: the door a hostile host's garbage
        takes (the chaos fault ``poison``, ``kmnode.host.poison``). The other side must shrug
        off whatever arrives this way, since the untrusted side of the ring can always write
        anything into it."""
        if self.closed.is_set():
            raise CircuitClosed(f"{self.name}: the other side is gone")
        self.sent += 1
        if self._backlog or not self._write(record):
            self._defer(record)
            return
        self._ring_for_turn()

    def _write(self, record: bytes) -> bool:
        """Write into the ring now; False if it is full."""
        try:
            self._writer.write(record)
        except RingFull:
            return False
        except RingError as exc:
            raise CircuitClosed(f"{self.name}: {exc}") from None
        return True

    def _defer(self, record: bytes) -> None:
        loop = asyncio.get_running_loop()
        if not self._backlog:
            self._backlog_since = loop.time()
        self._backlog.append(record)
        self._backlog_bytes += len(record)
        if self._backlog_bytes > MAX_BACKLOG:
            self.abandon(
                f"{self._backlog_bytes} bytes wait for room: the other side stopped reading"
            )
            raise CircuitClosed(f"{self.name}: the other side stopped reading")
        if self._backlog_timer is None:
            self._backlog_timer = loop.call_later(BACKLOG_RETRY_S, self._drain_backlog)

    def _drain_backlog(self) -> None:
        """Write what waited, in order, as far as the ring has room."""
        self._backlog_timer = None
        if self.closed.is_set():
            self._backlog.clear()
            return
        loop = asyncio.get_running_loop()
        wrote = False
        try:
            while self._backlog:
                record = self._backlog[0]
                if not self._write(record):
                    break
                self._backlog.popleft()
                self._backlog_bytes -= len(record)
                wrote = True
        except CircuitClosed as exc:
            self.abandon(str(exc))
            return
        if wrote:
            self._backlog_since = loop.time()
            self._ring()
        if self._backlog:
            if loop.time() - self._backlog_since > WRITE_TIMEOUT:
                self.abandon(f"no room in the ring for {WRITE_TIMEOUT:g}s: the other side is stuck")
                return
            self._backlog_timer = loop.call_later(BACKLOG_RETRY_S, self._drain_backlog)

    def _ring_for_turn(self) -> None:
        if not self._ring_pending:
            # The first record of a loop turn rings at once, so the other side starts on it
            # while this turn goes on (a leader's append must not wait for its own fsync);
            # records written after it in the same turn ring once more when the turn ends.
            self._ring_pending = True
            self._ring()
            asyncio.get_running_loop().call_soon(self._end_turn)
        else:
            self._unrung = True

    def _end_turn(self) -> None:
        self._ring_pending = False
        if self._unrung:
            self._unrung = False
            self._ring()

    def _ring(self) -> None:
        try:
            os.write(self._bell_out, b"\x01")
        except BlockingIOError:
            pass  # the doorbell is full of unread rings: the other side will look anyway
        except OSError as exc:
            self.abandon(f"the other side's doorbell is gone ({exc.strerror})")

    def notify(self, notice: Notice) -> None:
        """Send a notice; a closed circuit drops it (nobody is left to hear it)."""
        with contextlib.suppress(CircuitClosed):
            self._send(notice)

    def request(self, request: Request, timeout: float = 30.0) -> asyncio.Future[Reply]:
        """Send ``request`` now (not when awaited: it leaves in this loop turn) and return the
        future of its reply, which may be a ``Failure``; it fails with ``CircuitClosed`` if the
        other side goes away and ``TimeoutError`` after ``timeout``. Raises ``CircuitClosed``
        at once if the circuit is closed already."""
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._send(request.model_copy(update={"id": request_id}))
        # A timer handle, not asyncio.wait_for: that wraps every call in a task of its own,
        # which cost more than the crossing itself.
        timer = loop.call_later(timeout, _expire, future, request)
        self._pending[request_id] = future
        future.add_done_callback(partial(self._settled, request_id, timer))
        return future

    def _settled(self, request_id: int, timer: asyncio.TimerHandle, _: object) -> None:
        timer.cancel()
        self._pending.pop(request_id, None)

    async def call(self, request: Request, reply_type: type[R], timeout: float = 30.0) -> R:
        """Send ``request`` and wait for its reply. Raises ``Failed`` with the other side's
        ``Failure``, ``CircuitClosed`` if it goes away, ``TimeoutError`` after ``timeout``."""
        reply = await self.request(request, timeout)
        if isinstance(reply, Failure):
            raise Failed(reply)
        if not isinstance(reply, reply_type):
            raise CircuitError(
                f"{self.name}: {type(request).__name__} answered by {type(reply).__name__}"
            )
        return reply

    # --- receiving ----------------------------------------------------------------------------

    def _on_bell(self) -> None:
        try:
            rung = os.read(self._bell_in, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            rung = b""
            log.info("%s: doorbell failed: %s", self.name, exc.strerror)
        self._take()
        if not rung:  # end of file: every writer of the other side's doorbell is gone
            self.abandon("the other side closed its doorbell")

    def _take(self) -> None:
        try:
            records = self._reader.read_batch(4096)
        except RingError as exc:
            self.abandon(f"circuit ring failed: {exc}")
            return
        for record in records:
            self._dispatch(record)
        if len(records) == 4096:  # more than one batch waiting: come back on the next turn
            asyncio.get_running_loop().call_soon(self._take)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            asyncio.get_running_loop().remove_reader(self._bell_in)

    def _dispatch(self, record: bytes) -> None:
        try:
            message = decode(record)
        except CircuitError as exc:
            self.malformed += 1
            log.warning("%s: dropped a malformed record: %s", self.name, exc)
            return
        if isinstance(message, Reply):
            future = self._pending.get(message.id or 0)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, Request):
            task = asyncio.create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(message, Notice):
            try:
                self._on_notice(message)
            except Exception:  # a handler's bug must not stop the circuit
                log.exception("%s: notice handler failed", self.name)

    async def _answer(self, request: Request) -> None:
        try:
            reply = await self._on_request(request)
        except Failed as exc:
            reply = exc.failure
        except Exception as exc:
            log.exception("%s: %s failed", self.name, type(request).__name__)
            reply = Failure(code="internal", message=f"{type(exc).__name__} in the other side")
        with contextlib.suppress(CircuitClosed):
            self._send(reply.model_copy(update={"id": request.id}))

    def abandon(self, reason: str) -> None:
        """The other side is known to be gone (its process exited): fail what waits on it."""
        if not self.closed.is_set():
            log.info("%s: %s", self.name, reason)
        self._unwatch()
        self.closed.set()
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None
        self._backlog.clear()
        self._fail_pending()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CircuitClosed(f"{self.name}: the other side is gone"))
        self._pending.clear()


__all__ = [
    "CIRCUIT_CAPACITY",
    "Circuit",
    "CircuitClosed",
    "CircuitMode",
]
