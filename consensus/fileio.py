"""Small file-system helpers for crash-safe writes.

A rename is only durable once the directory holding it is fsynced, and a file's bytes only once
the file is; getting either wrong loses data on a power cut while every test still passes. The
helpers live here so the log and the snapshot store use one audited implementation.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte: ``os.write`` may write less than asked (signals, full pipes)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make creations, renames and deletions inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file, whole.

    Write a temporary file in the same directory, fsync it, rename it over the target, fsync
    the directory. With ``fsync=False`` (benchmarks only) the rename is still atomic against a
    process crash but not against a power cut.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data`` (``FileExistsError`` if it exists: an existing file,
    a key or a backup, is never overwritten), durably, readable only by its owner by default."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
