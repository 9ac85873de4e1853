"""A ring in a sealed memfd: the host cannot resize it, and the TEE side maps nothing else.

A named ring can be ftruncated by anyone who can open its name, and the TEE's next touch of a
lost page is a SIGBUS no bounds check can catch. The sealed ring is the node's answer: these
tests play the host trying to shrink or grow it, and hand the TEE side descriptors that lack
the seals, to show both are refused before any memory is touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from kmnode.ring import HEADER_SIZE, Reader, Ring, RingCorrupted, RingError, RingNotSealed, Writer
from tests.ring.conftest import unique_name

CAP = 1 << 16


@pytest.fixture
def sealed() -> Iterator[Ring]:
    ring = Ring.create_sealed(CAP, label="test")
    yield ring
    ring.close()


def unsealed_memfd(seals: int = 0, size: int = HEADER_SIZE + CAP) -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize("size", [0, HEADER_SIZE, HEADER_SIZE + CAP // 2, HEADER_SIZE + 2 * CAP])
def test_the_host_cannot_resize_a_sealed_ring(sealed: Ring, size: int) -> None:
    tee = Writer(Ring.attach_sealed(sealed.fileno(), CAP))
    with pytest.raises(OSError) as refused:
        os.ftruncate(sealed.fileno(), size)
    assert refused.value.errno == errno.EPERM
    # nor can it take the seals off, or reach the memory through another descriptor's resize
    with pytest.raises(OSError) as unsealing:
        fcntl.fcntl(sealed.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    assert unsealing.value.errno == errno.EPERM
    other = os.open(f"/proc/self/fd/{sealed.fileno()}", os.O_RDWR)
    try:
        with pytest.raises(OSError) as again:
            os.ftruncate(other, size)
        assert again.value.errno == errno.EPERM
    finally:
        os.close(other)
    assert os.fstat(sealed.fileno()).st_size == HEADER_SIZE + CAP
    # and the TEE carries on writing into every page of it (a SIGBUS would kill the test run)
    host = Reader(sealed)
    for i in range(2 * CAP // 4096):
        assert tee.write(bytes([i % 256]) * 4000, type=i)
        assert host.read_typed() == (i, bytes([i % 256]) * 4000)


@pytest.mark.parametrize(
    ("seals", "missing"),
    [
        (0, "F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL"),
        (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, "F_SEAL_SEAL"),
        (fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL, "F_SEAL_SHRINK"),
        (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL, "F_SEAL_GROW"),
    ],
)
def test_the_tee_side_refuses_a_memfd_without_the_seals(seals: int, missing: str) -> None:
    fd = unsealed_memfd(seals)
    try:
        with pytest.raises(RingNotSealed, match=f"lacks {missing}$"):
            Ring.attach_sealed(fd, CAP)
        # refused before anything was written: the memory is still all zeros
        assert os.pread(fd, HEADER_SIZE, 0) == bytes(HEADER_SIZE)
    finally:
        os.close(fd)


def test_the_tee_side_refuses_descriptors_that_are_no_memfd() -> None:
    named = Ring.create(unique_name("sealed"), CAP)
    shm = os.open(f"/dev/shm/{named.name.lstrip('/')}", os.O_RDWR)
    r, w = os.pipe()
    try:
        # a named object can always be resized (tmpfs reports it as sealed against sealing)
        with pytest.raises(RingNotSealed, match=r"lacks F_SEAL_SHRINK, F_SEAL_GROW$"):
            Ring.attach_sealed(shm, CAP)
        with pytest.raises(RingNotSealed, match="not a sealable memfd"):
            Ring.attach_sealed(r, CAP)
    finally:
        for fd in (shm, r, w):
            os.close(fd)
        named.close()


def test_the_tee_side_refuses_a_sealed_ring_of_another_size(sealed: Ring) -> None:
    with pytest.raises(RingCorrupted, match=f"expected {HEADER_SIZE + 2 * CAP}"):
        Ring.attach_sealed(sealed.fileno(), 2 * CAP)
    with pytest.raises(ValueError, match="not a valid ring capacity"):
        Ring.attach_sealed(sealed.fileno(), CAP + 1)


def test_a_sealed_memfd_that_is_not_a_ring_is_refused() -> None:
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fd = unsealed_memfd(seals)
    try:
        with pytest.raises(RingCorrupted, match="bad magic"):
            Ring.attach_sealed(fd, CAP)
    finally:
        os.close(fd)


def test_only_the_creator_of_a_sealed_ring_has_its_descriptor(sealed: Ring) -> None:
    fd = sealed.fileno()
    assert sealed.sealed
    tee = Ring.attach_sealed(fd, CAP)
    assert tee.sealed
    with pytest.raises(RingError, match="no descriptor"):
        tee.fileno()
    tee.close()
    sealed.close()
    with pytest.raises(OSError):  # closing the ring closed its memfd
        os.fstat(fd)


CHILD = textwrap.dedent(
    """
    import sys
    from kmnode.ring import Ring, Writer
    ring = Ring.attach_sealed(int(sys.argv[1]), int(sys.argv[2]))
    Writer(ring).write(b"from the child", type=7)
    ring.close()
    """
)


def test_a_child_gets_the_ring_by_inheritance_only(sealed: Ring) -> None:
    """The descriptor is close-on-exec: a child has it only when it is passed explicitly."""
    fd, cap = str(sealed.fileno()), str(CAP)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, fd, cap], pass_fds=(sealed.fileno(),), timeout=60
    )
    assert done.returncode == 0
    assert Reader(sealed).read_typed() == (7, b"from the child")
    refused = subprocess.run(
        [sys.executable, "-c", CHILD, fd, cap], capture_output=True, timeout=60
    )
    assert refused.returncode != 0
    assert b"RingNotSealed" in refused.stderr and b"Bad file descriptor" in refused.stderr
