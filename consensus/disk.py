"""The one directory of files the Raft log and the snapshot store write, as a port.

The log decides what to write (records, their tags, which segment, when to fsync); a ``Disk``
only does it. That split lets the decisions stay in the KM enclave while a host holds the files:
the enclave's disk (``kmnode.km.host_disk``) forwards each operation to the node's host, which
performs them in order, and the enclave waits only where durability matters (``durable``).

Every operation takes effect in the order it was made; ``sync``/``sync_dir`` make what came
before durable; ``durable()`` returns once everything asked so far is done. A ``LocalDisk``
does each operation at once (``deferred`` False, ``durable`` is immediate); a deferred disk
queues them and raises only from ``durable`` (or a later read) if one failed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from consensus.fileio import atomic_write, fsync_dir, write_all

#: File names a disk accepts: flat, no path separators, no dot files (so never ``..``).
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


class DiskError(OSError):
    """A disk operation failed, or named a file outside its directory."""


def check_name(name: str) -> str:
    """``name`` if it is a plain file name inside the directory; ``DiskError`` otherwise."""
    if not NAME.match(name):
        raise DiskError(f"not a plain file name: {name[:100]!r}")
    return name


class Disk(Protocol):
    """One directory of files (see the module docstring for the ordering contract)."""

    #: Where the files are, for messages (``CorruptLogError`` names the file).
    path: Path
    #: True when operations are queued and ``durable`` must be awaited (a host's disk).
    deferred: bool

    def listing(self) -> dict[str, int]:
        """Every file's name and size."""
        ...

    def read(self, name: str) -> bytes: ...

    def append(self, name: str, data: bytes) -> None:
        """Append to ``name``, creating it (mode 0600) if it does not exist."""
        ...

    def truncate(self, name: str, size: int) -> None: ...

    def replace(self, name: str, data: bytes, *, sync: bool) -> None:
        """Atomically make ``name`` hold ``data`` (temp file, fsync if ``sync``, rename, fsync
        of the directory if ``sync``): after a crash it holds the old or the new bytes."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name`` if it exists."""
        ...

    def sync(self, name: str) -> None:
        """Make ``name``'s bytes durable (fdatasync)."""
        ...

    def sync_dir(self) -> None:
        """Make creations, renames and deletions in the directory durable."""
        ...

    def durable(self) -> Awaitable[None]:
        """What to await for every operation made so far to be done. A deferred disk asks
        for that in this call (not when awaited), so the question leaves with the writes."""
        ...

    def close(self) -> None: ...


class LocalDisk:
    """A directory on this machine's file system; each operation happens at once."""

    deferred = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        #: Append descriptors kept open: a segment gets one write per Ready.
        self._fds: dict[str, int] = {}

    def _file(self, name: str) -> Path:
        return self.path / check_name(name)

    def listing(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in os.scandir(self.path):
            if entry.is_file(follow_symlinks=False) and NAME.match(entry.name):
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return out

    def read(self, name: str) -> bytes:
        return self._file(name).read_bytes()

    def read_at(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (what a host serves its enclave in pieces)."""
        with open(self._file(name), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self._file(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fds[name] = fd
        return fd

    def append(self, name: str, data: bytes) -> None:
        write_all(self._fd(name), data)

    def truncate(self, name: str, size: int) -> None:
        os.truncate(self._file(name), size)

    def replace(self, name: str, data: bytes, *, sync: bool) -> None:
        self._forget(name)
        atomic_write(self._file(name), data, fsync=sync)

    def delete(self, name: str) -> None:
        self._forget(name)
        self._file(name).unlink(missing_ok=True)

    def sync(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            os.fdatasync(fd)
            return
        fd = os.open(self._file(name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def sync_dir(self) -> None:
        fsync_dir(self.path)

    async def durable(self) -> None:
        return None

    def _forget(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self._forget(name)
