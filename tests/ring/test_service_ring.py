"""The service enclave's output ring between the host and the service, in one process.

The host half (``ServiceOutput``) runs on an event loop as in a node; the service half
(``RingOutput``) is blocking, as in the service process, so it runs in a worker thread. A
hostile host tampers with the ring under them: the service must report it, get a fresh ring
and keep writing, and must refuse a ring that is not sealed whatever the host grants.
"""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from kmnode.host.faults import RingStall
from kmnode.host.service_output import RingFailure, ServiceOutput
from kmnode.ring import LAYOUT
from kmnode.service.ring_output import RingOutput
from kmnode.service_pipe import (
    MAX_RING_MESSAGE,
    SERVICE_RING_CAPACITY,
    RingGrant,
    RingRequest,
    decode_ring_message,
    encode,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Host:
    output: ServiceOutput
    records: list[bytes] = field(default_factory=list)
    failures: list[RingFailure] = field(default_factory=list)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"timed out waiting for {what}")

    def tamper(self, field_name: str, value: int, width: int = 8) -> None:
        """What the host can do to the ring it made: write any header word."""
        with mmap.mmap(self.output.handoff.ring_fd, 4096) as header:
            struct.pack_into("<Q" if width == 8 else "<I", header, LAYOUT[field_name], value)


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    h = Host(ServiceOutput("t", lambda r: None))
    h.output.on_output = h.records.append
    h.output.on_ring_failed = h.failures.append
    h.output.start()
    try:
        yield h
    finally:
        await h.output.stop()


async def started_service(host: Host, **kwargs: float) -> RingOutput:
    """A RingOutput on the service's end of the socket, started on the inherited memfd."""
    handoff = host.output.handoff
    service = RingOutput(socket.socket(fileno=os.dup(handoff.control_fd)), **kwargs)
    await asyncio.to_thread(service.start, os.dup(handoff.ring_fd))
    return service


async def test_the_service_writes_to_the_ring_it_inherited(host: Host) -> None:
    service = await started_service(host)
    try:
        assert service.inode == host.output.ring_inode
        assert await asyncio.to_thread(service.write, b"proof", 1)
        await host.until(lambda: host.records == [b"proof"], "the record")
        assert host.failures == [] and host.output.replacements == 0
    finally:
        service.close()


@pytest.mark.parametrize(
    ("field_name", "value", "width", "error"),
    [
        ("write_offset", 0xDEAD_BEEF_0000, 8, "RingCorrupted: memfd:service-output: write offset"),
        ("capacity", 1 << 12, 8, "RingCorrupted: memfd:service-output: capacity"),
        ("writer_lock", 1, 4, "RingLockTimeout: memfd:service-output: TEE-side lock held"),
    ],
)
async def test_a_tampered_ring_is_reported_and_replaced_and_writing_goes_on(
    host: Host, field_name: str, value: int, width: int, error: str
) -> None:
    service = await started_service(host, write_timeout=0.2)
    try:
        assert await asyncio.to_thread(service.write, b"before", 1)
        await host.until(lambda: host.records == [b"before"], "the first record")
        first = host.output.ring_inode
        host.tamper(field_name, value, width)
        # the write that meets the tampering gets a fresh ring and lands there
        assert await asyncio.to_thread(service.write, b"after", 1)
        await host.until(lambda: host.records == [b"before", b"after"], "the second record")
        assert [f.error.startswith(error) for f in host.failures] == [True], host.failures
        assert host.failures[0].replaced and host.output.replacements == 1
        assert host.output.ring_inode != first and service.inode == host.output.ring_inode
        assert service.replacements == 1 and service.dropped == 0
    finally:
        service.close()


class FakeHost:
    """A host that answers every ring request with the descriptor it is given."""

    def __init__(self, grant_fd: int) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.grant_fd = grant_fd
        self.requests: list[RingRequest] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(16):
            data = self.ours.recv(MAX_RING_MESSAGE)
            if not data:
                return
            request = decode_ring_message(data, RingRequest)
            self.requests.append(request)
            grant = encode(RingGrant(id=request.id, ring=os.fstat(self.grant_fd).st_ino))
            socket.send_fds(self.ours, [grant], [self.grant_fd])

    def close(self) -> None:
        self.ours.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.ours.close()


def test_the_service_refuses_an_unsealed_ring_whatever_the_host_grants() -> None:
    unsealed = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, 4096 + SERVICE_RING_CAPACITY)
    fcntl.fcntl(unsealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    host = FakeHost(unsealed)
    service = RingOutput(host.theirs, grant_timeout=2.0)
    try:
        service.start(os.dup(unsealed))
        assert not service.write(b"never into an unsealed ring", 1)
        assert service.inode == 0 and service.dropped == 1
        # told at every turn why: the inherited ring, then each ring granted, refused
        errors = [r.error for r in host.requests]
        assert errors[0].startswith("RingNotSealed: memfd:service-output: descriptor")
        assert errors[0].endswith("lacks F_SEAL_SHRINK, F_SEAL_SEAL")
        assert all(e.startswith("RingNotSealed") or e == "no usable ring" for e in errors)
        assert 2 <= len(errors) <= 8  # asked again, a bounded number of times
        assert os.pread(unsealed, 8, 0) == bytes(8)  # and nothing was written to it
    finally:
        host.close()
        service.close()
        os.close(unsealed)


async def test_a_full_ring_drops_records_and_keeps_the_ring() -> None:
    """A host that stops draining fills the ring: that is no failure of the ring, so the
    service drops (and counts) what does not fit, asks for nothing, and writes again once the
    host drains."""
    stall = RingStall()
    host = Host(ServiceOutput("t", lambda r: None, stall))
    host.output.on_output = host.records.append
    host.output.on_ring_failed = host.failures.append
    host.output.start()
    service = await started_service(host, write_timeout=0.01)
    try:
        stall.set(True)
        record = b"r" * 4000  # 4 KiB a record with its frame and padding: 256 fill the ring
        written = [await asyncio.to_thread(service.write, record, 1) for _ in range(300)]
        # (the drain may have taken a batch before it saw the stall)
        assert SERVICE_RING_CAPACITY // 4008 <= sum(written) < 300 and not written[-1]
        assert service.dropped == 300 - sum(written)
        stall.set(False)
        await host.until(lambda: len(host.records) == sum(written), "the drain")
        assert await asyncio.to_thread(service.write, b"again", 1)
        await host.until(lambda: host.records[-1:] == [b"again"], "the next record")
        assert host.failures == [] and host.output.replacements == 0 and service.replacements == 0
    finally:
        service.close()
        await host.output.stop()
