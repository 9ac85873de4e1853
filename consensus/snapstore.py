"""Snapshot files: one whole file per snapshot, written atomically, checksummed.

A snapshot is written with temp + fsync + rename + fsync(dir), so after any crash a snapshot
file is either absent or complete. A checksum mismatch in one therefore means the disk damaged
it, and loading refuses (``CorruptSnapshotError``) instead of starting from a wrong image.

With a ``RecordAuth`` (``consensus.recordauth``) the file is authenticated too (``KMSNAP02``: a
tag under the node's key after the body), so a fabricated or foreign snapshot is refused, and so
is one written without a tag. Without a key a tagged snapshot is read unchecked (offline tools).
"""

from __future__ import annotations

import hmac
import logging
import re
import struct
import zlib
from pathlib import Path

import msgpack

from consensus.disk import Disk
from consensus.recordauth import TAG_SIZE, RecordAuth
from consensus.segments import StorageError
from consensus.types import ConfState, Snapshot, SnapshotMeta

log = logging.getLogger(__name__)

MAGIC = b"KMSNAP01"
#: An authenticated snapshot: the same layout, then ``TAG_SIZE`` bytes of tag.
MAGIC_AUTH = b"KMSNAP02"
#: Separates a snapshot's tag input from a log record's.
_TAG_DOMAIN = b"kmsim snapshot file\0"
_HEAD = struct.Struct("<IQ")
_NAME = re.compile(r"^snap-(\d{20})-(\d{20})\.snap$")
_TEMP = re.compile(r"^snap-.*\.snap\.tmp$")


class CorruptSnapshotError(StorageError):
    """A snapshot file fails its checksum or does not parse."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"corrupt snapshot {path}: {reason}")
        self.path = path
        self.reason = reason


def snapshot_name(meta: SnapshotMeta) -> str:
    return f"snap-{meta.index:020d}-{meta.term:020d}.snap"


def encode_snapshot(snap: Snapshot, auth: RecordAuth | None = None) -> bytes:
    body = msgpack.packb(
        [
            snap.meta.index,
            snap.meta.term,
            list(snap.meta.conf.voters),
            list(snap.meta.conf.learners),
            snap.data,
        ],
        use_bin_type=True,
    )
    if auth is None:
        return MAGIC + _HEAD.pack(zlib.crc32(body), len(body)) + body
    signed = MAGIC_AUTH + _HEAD.pack(zlib.crc32(body), len(body)) + body
    return signed + auth.tag(_TAG_DOMAIN + signed)


def decode_snapshot(path: Path, raw: bytes, auth: RecordAuth | None = None) -> Snapshot:
    magic = raw[: len(MAGIC)]
    if magic not in (MAGIC, MAGIC_AUTH) or len(raw) < len(MAGIC) + _HEAD.size:
        raise CorruptSnapshotError(path, "bad magic or short header")
    if magic == MAGIC_AUTH:
        if len(raw) < len(MAGIC) + _HEAD.size + TAG_SIZE:
            raise CorruptSnapshotError(path, "short authenticated snapshot")
        raw, tag = raw[:-TAG_SIZE], raw[-TAG_SIZE:]
        if auth is not None and not hmac.compare_digest(auth.tag(_TAG_DOMAIN + raw), tag):
            raise CorruptSnapshotError(
                path, "tag does not verify (fabricated, changed, or another node's snapshot)"
            )
    elif auth is not None:
        raise CorruptSnapshotError(path, "not authenticated (written without this node's key)")
    crc, length = _HEAD.unpack_from(raw, len(MAGIC))
    body = raw[len(MAGIC) + _HEAD.size :]
    if len(body) != length:
        raise CorruptSnapshotError(path, f"body is {len(body)} bytes, header says {length}")
    if zlib.crc32(body) != crc:
        raise CorruptSnapshotError(path, "checksum mismatch")
    try:
        index, term, voters, learners, data = msgpack.unpackb(body, raw=False)
        meta = SnapshotMeta(
            index=int(index),
            term=int(term),
            conf=ConfState(
                voters=tuple(str(v) for v in voters), learners=tuple(str(v) for v in learners)
            ),
        )
        if not isinstance(data, bytes):
            raise TypeError("snapshot data is not bytes")
    except (ValueError, TypeError) as exc:
        raise CorruptSnapshotError(path, f"unparseable body: {exc}") from exc
    return Snapshot(meta=meta, data=data)


class SnapshotStore:
    """The snapshot files of one data directory; only the newest is kept once it is durable."""

    def __init__(self, disk: Disk, *, fsync: bool = True, auth: RecordAuth | None = None) -> None:
        self.disk = disk
        self.fsync = fsync
        self.auth = auth

    def _files(self, listing: dict[str, int] | None = None) -> list[tuple[int, str]]:
        names = self.disk.listing() if listing is None else listing
        return sorted((int(m.group(1)), name) for name in names if (m := _NAME.match(name)))

    def load_newest(self, listing: dict[str, int] | None = None) -> Snapshot:
        """Return the newest snapshot, or an empty one; leftover temp files are removed.
        ``listing``: the directory's, if the caller has just taken it."""
        names = self.disk.listing() if listing is None else listing
        for name in names:
            if _TEMP.match(name):
                log.info("removing unfinished snapshot %s", self.disk.path / name)
                self.disk.delete(name)
        files = self._files(names)
        if not files:
            return Snapshot()
        _, name = files[-1]
        return decode_snapshot(self.disk.path / name, self.disk.read(name), self.auth)

    def save(self, snap: Snapshot) -> None:
        """Write ``snap`` atomically, then delete older snapshot files.

        Two saves may overlap (the driver writes its own snapshots in a thread while a snapshot
        from the leader may be installed), so an older file may already be gone.
        """
        disk = self.disk
        disk.replace(snapshot_name(snap.meta), encode_snapshot(snap, self.auth), sync=self.fsync)
        removed = False
        for index, old in self._files():
            if index < snap.meta.index:
                disk.delete(old)
                removed = True
        if removed and self.fsync:
            disk.sync_dir()
