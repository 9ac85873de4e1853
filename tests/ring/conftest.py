"""Fixtures for ring tests: unique shared-memory names, and a hostile host's raw view of a ring."""

from __future__ import annotations

import mmap
import os
import struct
import uuid
from collections.abc import Iterator

import pytest

from kmnode.ring import LAYOUT, Ring


def unique_name(tag: str = "t") -> str:
    return f"kmring-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


class HostileHost:
    """What any process with the name can do: map the object and write whatever it likes."""

    def __init__(self, name: str) -> None:
        self._file = open(f"/dev/shm/{name.lstrip('/')}", "r+b")  # noqa: SIM115
        self.mm = mmap.mmap(self._file.fileno(), 0)

    def get64(self, field: str) -> int:
        value: int = struct.unpack_from("<Q", self.mm, LAYOUT[field])[0]
        return value

    def set64(self, field: str, value: int) -> None:
        struct.pack_into("<Q", self.mm, LAYOUT[field], value & 0xFFFFFFFFFFFFFFFF)

    def get32(self, field: str) -> int:
        value: int = struct.unpack_from("<I", self.mm, LAYOUT[field])[0]
        return value

    def set32(self, field: str, value: int) -> None:
        struct.pack_into("<I", self.mm, LAYOUT[field], value & 0xFFFFFFFF)

    def data_at(self, offset: int, capacity: int) -> int:
        return LAYOUT["data"] + offset % capacity

    def set_frame(self, offset: int, capacity: int, length: int, rtype: int = 0) -> None:
        struct.pack_into("<II", self.mm, self.data_at(offset, capacity), length & 0xFFFFFFFF, rtype)

    def snapshot(self) -> bytes:
        return bytes(self.mm)

    def close(self) -> None:
        self.mm.close()
        self._file.close()


@pytest.fixture
def ring_name() -> str:
    return unique_name()


@pytest.fixture
def small_ring(ring_name: str) -> Iterator[Ring]:
    ring = Ring.create(ring_name, 4096, max_record=1000)
    yield ring
    ring.close()


@pytest.fixture
def host(small_ring: Ring) -> Iterator[HostileHost]:
    h = HostileHost(small_ring.name)
    yield h
    h.close()
