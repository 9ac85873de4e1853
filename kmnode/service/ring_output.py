"""The service enclave's output: records into the host's ring, and a fresh ring when it fails.

The ring is shared with the untrusted host, which may tamper with its header, sit on its lock
or corrupt its frames; the Writer answers each with a RingError instead of acting on it. The
keys this enclave was provisioned with live in this process's memory only, so such an error
must never end the process: the service reports it to the host (the error's name and message,
offsets and sizes, never a key), asks for a fresh ring over the ring-control socket
(``kmnode.service_pipe.RingRequest``), maps the sealed memfd that comes back only if its seals
and size are right (``Ring.attach_sealed``), and writes the record there. Every wait is
bounded: a host that never answers costs the record, not the enclave.

A full ring (the host stopped draining) is an ordinary condition, not a failure of the ring:
the record is dropped and counted, and the ring is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time

from kmnode.ring import OnFull, RecordTooLarge, Ring, RingError, RingFull, Writer
from kmnode.service_pipe import (
    MAX_RING_MESSAGE,
    SERVICE_RING_CAPACITY,
    PipeError,
    RingGrant,
    RingRequest,
    decode_ring_message,
    encode,
)

log = logging.getLogger(__name__)

#: How long the service waits for the host to answer a ring request.
GRANT_TIMEOUT = 5.0
#: Messages read while waiting for one grant (stale grants for earlier requests are skipped).
MAX_MESSAGES_PER_REQUEST = 16
#: Rings tried per request: a host that keeps handing over bad ones is asked again, not forever.
MAX_GRANTS_PER_REQUEST = 3


def describe(exc: BaseException) -> str:
    """The report of a ring error: its type and message, cut to what a RingRequest carries."""
    return f"{type(exc).__name__}: {exc}"[:512]


class RingOutput:
    """Where the service enclave's records go; ``write`` never raises a ring failure."""

    def __init__(
        self,
        control: socket.socket,
        capacity: int = SERVICE_RING_CAPACITY,
        *,
        write_timeout: float = 1.0,
        grant_timeout: float = GRANT_TIMEOUT,
    ) -> None:
        self._control = control
        self._capacity = capacity
        self._write_timeout = write_timeout
        self._grant_timeout = grant_timeout
        self._ring: Ring | None = None
        self._writer: Writer | None = None
        #: The memfd inode of the ring written to (0: none): names it to the host.
        self._inode = 0
        #: Records not written (ring full, or no ring to be had); rings replaced.
        self.dropped = 0
        self.replacements = 0

    @property
    def inode(self) -> int:
        return self._inode

    def start(self, inherited_fd: int) -> None:
        """Map the ring inherited at spawn, then ask the host whether it is still the current
        one (after a replacement, the KM enclave process still passes the first ring on to a
        restarted service enclave)."""
        error = ""
        try:
            self._adopt(inherited_fd)
        except (RingError, OSError) as exc:
            error = describe(exc)
            log.error("inherited output ring refused: %s", error)
        finally:
            os.close(inherited_fd)
        self._request(error)

    def write(self, data: bytes, type: int = 0) -> bool:
        """Write one record; False if it was dropped (ring full, or no ring could be had)."""
        if self._writer is None:
            self._request("no usable ring")
        for attempt in range(2):
            writer = self._writer
            if writer is None:
                break
            try:
                return writer.write(data, type)
            except RecordTooLarge:
                raise
            except RingFull:
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th...
                    log.warning("output ring full: record dropped (%d so far)", self.dropped)
                return False
            except RingError as exc:
                error = describe(exc)
                log.error("output ring failed: %s; asking the host for a fresh ring", error)
                self._writer = None
                if attempt == 0:
                    self._request(error)
        self.dropped += 1
        return False

    def close(self) -> None:
        self._writer = None
        if self._ring is not None:
            with contextlib.suppress(RingError, BufferError):
                self._ring.close()
            self._ring = None

    # --- getting a ring -------------------------------------------------------------------------

    def _adopt(self, fd: int) -> bool:
        """Write to the ring in ``fd`` from now on (True), unless it is the one already in use
        (False). Raises RingError (unsealed, wrong size, bad header, held lock) and leaves the
        current ring as it was."""
        inode = os.fstat(fd).st_ino
        if inode == self._inode and self._writer is not None:
            return False
        ring = Ring.attach_sealed(fd, self._capacity, label="service-output")
        try:
            writer = Writer(
                ring, on_full=OnFull.WAIT, timeout=self._write_timeout, lock_timeout=1.0
            )
        except BaseException:
            ring.close()
            raise
        self.close()
        self._ring, self._writer, self._inode = ring, writer, inode
        return True

    def _request(self, error: str) -> None:
        """Send a RingRequest (reporting ``error``, if any) and adopt the ring granted."""
        for _ in range(MAX_GRANTS_PER_REQUEST):
            nonce = secrets.randbits(62)
            request = RingRequest(id=nonce, ring=self._inode, error=error)
            try:
                self._control.send(encode(request))
                fd = self._await_grant(nonce)
            except OSError as exc:
                log.error("no answer from the host about the output ring: %r", exc)
                return
            if fd is None:
                log.error("the host sent no output ring within %gs", self._grant_timeout)
                return
            try:
                if self._adopt(fd):
                    self.replacements += int(bool(error))
                    log.warning("writing to a fresh output ring (inode %d)", self._inode)
                return
            except (RingError, OSError) as exc:
                error = describe(exc)
                log.error("granted output ring refused: %s", error)
            finally:
                os.close(fd)

    def _await_grant(self, nonce: int) -> int | None:
        """The memfd of the grant answering request ``nonce``, or None on timeout."""
        deadline = time.monotonic() + self._grant_timeout
        for _ in range(MAX_MESSAGES_PER_REQUEST):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._control.settimeout(left)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._control, MAX_RING_MESSAGE, 4)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionResetError("the ring-control socket was closed")
            try:
                grant = decode_ring_message(data, RingGrant)
            except PipeError as exc:
                log.warning("ignored a ring-control message: %s", exc)
                grant = None
            if grant is not None and grant.id == nonce and len(fds) == 1:
                return fds[0]
            for fd in fds:  # a stale or malformed grant: its descriptors are not ours to keep
                os.close(fd)
        return None
