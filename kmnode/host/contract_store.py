"""The host's contract-state store: sealed records in SQLite, an external cache in front.

The service enclave keeps contract state here (``kmnode.contracts.store_wire`` is its client):
records it sealed, keyed by (contract, hidden key), opaque to the host. The host trusts none
of it and needs to understand none of it; the enclave checks every record it reads back.

* Durability: a ``put_many`` is one SQLite transaction (WAL, ``synchronous=FULL`` when fsync
  is on), answered only after it committed, so a batch the enclave saw acknowledged survives a
  crash of the host, and a batch is all there or not at all.
* The external cache: an LRU of records (and of known absences) by entries, in front of reads,
  because the enclave's own cache misses land here and SQLite is a disk away.
* Checkpoints: copies of all current records by sequence number (the newest
  ``KEEP_CHECKPOINTS``), to restore a node whose state root went wrong, locally or from a
  peer's copy (``kmctl contracts resync``).
* Tampering, for the chaos API: the host acting as the attacker it is assumed to be. To roll a
  key back it needs an older record of it, so each overwrite or delete keeps the record it
  replaced in ``history`` (the last one per key). Tampering writes through the external cache
  too, so the enclave's next read of that key sees the lie wherever it would be served from.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kmnode.contracts.sealed_state import HIDDEN_BYTES, VERSION_BYTES
from kmnode.contracts.store_wire import (
    MAX_FRAME_BYTES,
    Checkpoint,
    CheckpointList,
    Done,
    Found,
    FrameReader,
    Get,
    ListCheckpoints,
    ListRecords,
    PutMany,
    RecordEntry,
    RecordsPage,
    Reply,
    Request,
    Restore,
    Restored,
    StoreWireError,
    check_contract,
    check_hidden,
    check_record,
    check_seq,
    decode_request,
    encode_reply,
    frame,
    refusal,
    request_id_of,
)

log = logging.getLogger(__name__)

#: The store's file in a node's data directory.
FILE_NAME = "contracts.sqlite"
#: Checkpoints kept (the newest by sequence number).
KEEP_CHECKPOINTS = 2
#: Records the external cache holds by default.
DEFAULT_CACHE_ENTRIES = 65_536
#: Bytes of records one page of ``records`` carries at most (half a frame: room to spare).
PAGE_BYTES = MAX_FRAME_BYTES // 2
#: Bytes of a batch's parts one connection may stage before its final part (bounds what an
#: enclave gone wrong can make the host hold; the enclave's cache flushes far less by default).
MAX_STAGED_BYTES = 256 << 20
#: How often a serving thread looks up from its socket to see whether the store is closing.
_POLL_SECONDS = 0.1
#: Longest a reply may take to leave (an enclave that stopped reading loses its connection).
_SEND_TIMEOUT = 30.0

TamperMode = Literal["flip", "swap", "rollback", "drop"]
_Slot = tuple[str, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    contract TEXT NOT NULL, hidden BLOB NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (contract, hidden)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    contract TEXT NOT NULL, hidden BLOB NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (contract, hidden)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS checkpoint_records (
    seq INTEGER NOT NULL, contract TEXT NOT NULL, hidden BLOB NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (seq, contract, hidden)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class CacheStats:
    """The external cache: how full, and how often reads found what they asked for."""

    entries: int
    capacity: int
    hits: int
    misses: int


class _Lru:
    """Records (``None``: known absent) by slot, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the external cache holds at least 1 entry")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._slots: OrderedDict[_Slot, bytes | None] = OrderedDict()

    def get(self, slot: _Slot) -> tuple[bool, bytes | None]:
        """(whether the cache knows the slot, its record)."""
        if slot not in self._slots:
            self.misses += 1
            return False, None
        self.hits += 1
        self._slots.move_to_end(slot)
        return True, self._slots[slot]

    def put(self, slot: _Slot, record: bytes | None) -> None:
        self._slots[slot] = record
        self._slots.move_to_end(slot)
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)

    def clear(self) -> None:
        self._slots.clear()

    def stats(self) -> CacheStats:
        return CacheStats(len(self._slots), self.capacity, self.hits, self.misses)


@dataclass
class _Staged:
    """One connection's parts of a batch that has not reached its final part."""

    contract: str = ""
    next_part: int = 0
    size: int = 0
    records: dict[bytes, bytes | None] = field(default_factory=dict)

    def reset(self, contract: str = "") -> None:
        self.contract, self.next_part, self.size, self.records = contract, 0, 0, {}


class _Hangup(Exception):
    """The connection must close (its stream has no frame boundary left to trust)."""


class ContractStore:
    """Sealed contract records in SQLite at ``path``, an external cache in front of reads.

    Thread-safe: the serving threads (one per enclave connection) and the host's own callers
    (chaos API, resync) share one connection under one lock.
    """

    def __init__(
        self, path: Path, *, fsync: bool = True, cache_entries: int = DEFAULT_CACHE_ENTRIES
    ) -> None:
        self.path = path
        self._cache = _Lru(cache_entries)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._serving: list[threading.Thread] = []
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.executescript(_SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, fsync: bool = True) -> ContractStore:
        return cls(data_dir / FILE_NAME, fsync=fsync)

    # ---- what the enclave asks for -------------------------------------------------------

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        slot = (contract, hidden)
        with self._lock:
            known, cached = self._cache.get(slot)
            if known:
                return cached
            row = self._db.execute(
                "SELECT record FROM records WHERE contract = ? AND hidden = ?", slot
            ).fetchone()
            record: bytes | None = None if row is None else row[0]
            self._cache.put(slot, record)
            return record

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None:
        """Store a batch in one transaction (``None`` deletes); committed when this returns.
        The record each key held before is kept in ``history`` (for ``tamper("rollback")``)."""
        _check_batch(contract, records.items())
        with self._lock:
            with self._transaction():
                for hidden, record in records.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO history SELECT contract, hidden, record "
                        "FROM records WHERE contract = ? AND hidden = ? AND record IS NOT ?",
                        (contract, hidden, record),
                    )
                    self._write(contract, hidden, record)
            for hidden, record in records.items():
                self._cache.put((contract, hidden), record)

    def checkpoint(self, seq: int) -> None:
        """Keep a copy of all current records as checkpoint ``seq`` (replacing one of that
        number); only the newest ``KEEP_CHECKPOINTS`` by number are kept."""
        check_seq(seq)
        with self._lock, self._transaction():
            self._drop_checkpoint(seq)
            self._db.execute("INSERT INTO checkpoints (seq) VALUES (?)", (seq,))
            self._db.execute(
                "INSERT INTO checkpoint_records SELECT ?, contract, hidden, record FROM records",
                (seq,),
            )
            self._prune_checkpoints()

    def restore(self, seq: int) -> bool:
        """Make checkpoint ``seq``'s copy the current records; False if there is none.

        ``history`` is emptied too: it holds what keys held before their last overwrite, and
        after a restore those records come from before the checkpoint's, so "rolling back"
        to one could hand the enclave a newer record than the one it now expects."""
        check_seq(seq)
        with self._lock:
            if not self._has_checkpoint(seq):
                return False
            with self._transaction():
                self._db.execute("DELETE FROM records")
                self._db.execute("DELETE FROM history")
                self._db.execute(
                    "INSERT INTO records SELECT contract, hidden, record "
                    "FROM checkpoint_records WHERE seq = ?",
                    (seq,),
                )
            self._cache.clear()
            return True

    def page(
        self, contract: str | None, after: tuple[str, bytes] | None, limit: int
    ) -> tuple[list[RecordEntry], bool]:
        """Up to ``limit`` records after ``after`` in (contract, hidden) order, and whether
        more follow; a page stops early at ``PAGE_BYTES`` (a frame must carry it)."""
        where: list[str] = []
        args: list[object] = []
        if contract is not None:
            where.append("contract = ?")
            args.append(contract)
        if after is not None:
            where.append("(contract, hidden) > (?, ?)")
            args.extend(after)
        sql = "SELECT contract, hidden, record FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY contract, hidden LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        entries: list[RecordEntry] = []
        size = 0
        for name, hidden, record in rows[:limit]:
            size += len(name) + len(hidden) + len(record) + 8
            if entries and size > PAGE_BYTES:
                return entries, True
            entries.append((name, hidden, record))
        return entries, len(rows) > limit

    def records(self, contract: str | None = None) -> Iterator[RecordEntry]:
        """Every current record (of ``contract``, or all), page by page."""
        after: tuple[str, bytes] | None = None
        while True:
            entries, more = self.page(contract, after, 1024)
            yield from entries
            if not more or not entries:
                return
            after = entries[-1][:2]

    def checkpoints(self) -> list[int]:
        with self._lock:
            rows = self._db.execute("SELECT seq FROM checkpoints ORDER BY seq").fetchall()
        return [seq for (seq,) in rows]

    def stats(self) -> CacheStats:
        with self._lock:
            return self._cache.stats()

    # ---- what only the host does ---------------------------------------------------------

    def export_checkpoint(self, seq: int) -> list[RecordEntry]:
        """Checkpoint ``seq``'s records (for a peer's resync); ``LookupError`` if none."""
        with self._lock:
            if not self._has_checkpoint(seq):
                raise LookupError(f"no checkpoint {seq} in this store")
            rows = self._db.execute(
                "SELECT contract, hidden, record FROM checkpoint_records WHERE seq = ? "
                "ORDER BY contract, hidden",
                (seq,),
            ).fetchall()
        return [(name, hidden, record) for name, hidden, record in rows]

    def import_checkpoint(self, seq: int, records: Iterable[RecordEntry]) -> None:
        """Make ``records`` (a peer's copy) this store's checkpoint ``seq``; the current
        records stay until ``restore(seq)``. ``ValueError`` if a record breaks the limits
        the wire holds the enclave to (they came from elsewhere)."""
        copied = list(records)
        try:
            check_seq(seq)
            for contract, hidden, record in copied:
                _check_batch(contract, [(hidden, record)])
        except StoreWireError as exc:
            raise ValueError(f"checkpoint {seq} cannot be imported: {exc}") from None
        with self._lock, self._transaction():
            self._drop_checkpoint(seq)
            self._db.execute("INSERT INTO checkpoints (seq) VALUES (?)", (seq,))
            self._db.executemany(
                "INSERT OR REPLACE INTO checkpoint_records VALUES (?, ?, ?, ?)",
                ((seq, *entry) for entry in copied),
            )
            self._prune_checkpoints()

    def tamper(self, mode: TamperMode, contract: str | None, rng: random.Random) -> str:
        """Change the current records as an attacking host would, so that the enclave's next
        read of the key gets the lie (see the module docstring); a one-line description of
        what was done (naming no record bytes). ``ValueError`` if there is nothing to act on.

        A flip changes a byte of the sealed value, past the record's version and hidden-key
        header: a header byte changed reads as another key or an older version, which the
        ``swap`` and ``rollback`` modes are for; this one is the AEAD's to catch."""
        scope = "any contract" if contract is None else f"contract {contract!r}"
        description = self._tamper(mode, contract, scope, rng)
        log.warning("contract store: tampered on request: %s", description)
        return description

    def _tamper(
        self, mode: TamperMode, contract: str | None, scope: str, rng: random.Random
    ) -> str:
        with self._lock:
            if mode == "flip":
                name, hidden, record = self._pick_record(
                    contract, rng, f"nothing to flip: no records in {scope}", nonempty=True
                )
                header = VERSION_BYTES + HIDDEN_BYTES
                start = header if len(record) > header else 0
                position = rng.randrange(start, len(record))
                changed = bytearray(record)
                changed[position] ^= rng.randrange(1, 256)
                self._overwrite((name, hidden, bytes(changed)))
                return f"flip: changed byte {position} of a record of contract {name!r}"
            if mode == "swap":
                where, args = _scope(contract)
                count = self._count(_RECORDS + where, args)
                if count < 2:
                    raise ValueError(f"nothing to swap: it takes 2 records; {scope} has {count}")
                first, second = rng.sample(range(count), 2)
                a = self._nth(_RECORDS + where, args, first)
                b = self._nth(_RECORDS + where, args, second)
                self._overwrite((a[0], a[1], b[2]), (b[0], b[1], a[2]))
                of = f"contract {a[0]!r}" if a[0] == b[0] else f"contracts {a[0]!r} and {b[0]!r}"
                return f"swap: exchanged two records of {of}"
            if mode == "rollback":
                name, hidden, old = self._pick_history(contract, rng, scope)
                self._overwrite((name, hidden, old))
                return f"rollback: put back an older record of a key of contract {name!r}"
            if mode == "drop":
                name, hidden, _ = self._pick_record(
                    contract, rng, f"nothing to drop: no records in {scope}"
                )
                self._overwrite((name, hidden, None))
                return f"drop: deleted a record of contract {name!r}"
        raise ValueError(f"unknown tamper mode {mode!r}; one of flip, swap, rollback, drop")

    # ---- serving the enclave -------------------------------------------------------------

    def serve(self, sock: socket.socket) -> threading.Thread:
        """Answer ``StoreClient`` requests on ``sock`` in a daemon thread until EOF (or
        ``close``); the thread owns ``sock`` and closes it. A request that does not decode
        gets a refusal and the thread goes on; a frame over the limit leaves no frame
        boundary to trust, so it gets a refusal and the connection is closed."""
        thread = threading.Thread(
            target=self._serve, args=(sock,), name="contract-store", daemon=True
        )
        with self._lock:
            if self._closing.is_set():
                raise RuntimeError("the contract store is closed")
            self._serving = [t for t in self._serving if t.is_alive()]
            self._serving.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop serving (each thread closes its socket) and close the database."""
        self._closing.set()
        with self._lock:
            threads = list(self._serving)
        for thread in threads:
            thread.join(timeout=_SEND_TIMEOUT + 1)
        with self._lock:
            self._db.close()

    def __enter__(self) -> ContractStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ContractStore({str(self.path)!r}, {self._cache.stats()})"

    def _serve(self, sock: socket.socket) -> None:
        frames = FrameReader()
        staged = _Staged()
        with contextlib.closing(sock), selectors.DefaultSelector() as selector:
            sock.settimeout(_SEND_TIMEOUT)
            selector.register(sock, selectors.EVENT_READ)
            try:
                while not self._closing.is_set():
                    if not selector.select(_POLL_SECONDS):
                        continue
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    frames.feed(data)
                    while (body := self._next_frame(frames, sock)) is not None:
                        sock.sendall(frame(self._answer(body, staged)))
            except _Hangup:
                return
            except OSError as exc:
                log.warning("contract store: connection lost (%s)", type(exc).__name__)
            except Exception:  # a bug here must not take the host down with it
                log.exception("contract store: serving thread failed")

    def _next_frame(self, frames: FrameReader, sock: socket.socket) -> bytes | None:
        try:
            return frames.next()
        except StoreWireError as exc:
            log.warning("contract store: %s; closing the connection", exc)
            with contextlib.suppress(OSError):
                sock.sendall(frame(encode_reply(0, refusal(f"bad frame: {exc}"))))
            raise _Hangup from None

    def _answer(self, body: bytes, staged: _Staged) -> bytes:
        request_id = request_id_of(body)
        reply: Reply
        try:
            request_id, request = decode_request(body)
            reply = self._handle(request, staged)
        except StoreWireError as exc:
            log.warning("contract store: refused a request: %s", exc)
            reply = refusal(f"bad request: {exc}")
        except sqlite3.Error as exc:
            log.error("contract store: the database failed: %s", exc)
            staged.reset()
            reply = refusal(f"store failed: {exc}")
        except (ValueError, OverflowError) as exc:
            # A field that decodes but no table can hold (a sequence number past SQLite's
            # 64-bit integers): refused like any bad request, the connection kept.
            staged.reset()
            reply = refusal(f"bad request: {type(exc).__name__}")
        try:
            return encode_reply(request_id, reply)
        except StoreWireError as exc:
            return encode_reply(request_id, refusal(f"no reply fits the wire: {exc}"))

    def _handle(self, request: Request, staged: _Staged) -> Reply:
        match request:
            case Get(contract, hidden):
                return Found(self.get(contract, hidden))
            case PutMany():
                return self._put_part(request, staged)
            case Checkpoint(seq):
                self.checkpoint(seq)
                return Done()
            case Restore(seq):
                return Restored(self.restore(seq))
            case ListRecords(contract, after, limit):
                entries, more = self.page(contract, after, limit)
                return RecordsPage(tuple(entries), more)
            case ListCheckpoints():
                return CheckpointList(tuple(self.checkpoints()))
        raise StoreWireError(f"no handler for {type(request).__name__}")

    # ---- internals -----------------------------------------------------------------------

    def _put_part(self, request: PutMany, staged: _Staged) -> Reply:
        """Stage a part of a batch; the final part commits the batch (see ``store_wire``)."""
        if request.part == 0:
            staged.reset(request.contract)
        elif request.part != staged.next_part or request.contract != staged.contract:
            expected = staged.next_part
            staged.reset()
            raise StoreWireError(f"put part {request.part} out of order (expected {expected})")
        for hidden, record in request.entries:
            staged.records[hidden] = record
            staged.size += HIDDEN_BYTES + (0 if record is None else len(record))
        if staged.size > MAX_STAGED_BYTES:
            staged.reset()
            raise StoreWireError(f"a batch over {MAX_STAGED_BYTES} bytes")
        staged.next_part += 1
        if request.final:
            records = staged.records
            staged.reset()
            self.put_many(request.contract, records)
        return Done()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite write transaction (callers hold ``_lock``)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _write(self, contract: str, hidden: bytes, record: bytes | None) -> None:
        if record is None:
            self._db.execute(
                "DELETE FROM records WHERE contract = ? AND hidden = ?", (contract, hidden)
            )
        else:
            self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (contract, hidden, record)
            )

    def _overwrite(self, *writes: tuple[str, bytes, bytes | None]) -> None:
        """A tamper's writes: to the records and the external cache, never to ``history``."""
        with self._transaction():
            for contract, hidden, record in writes:
                self._write(contract, hidden, record)
        for contract, hidden, record in writes:
            self._cache.put((contract, hidden), record)

    def _count(self, query: str, args: tuple[object, ...]) -> int:
        row = self._db.execute(f"SELECT COUNT(*) FROM ({query})", args).fetchone()
        return int(row[0])

    def _nth(self, query: str, args: tuple[object, ...], index: int) -> RecordEntry:
        name, hidden, record = self._db.execute(
            f"{query} ORDER BY 1, 2 LIMIT 1 OFFSET ?", (*args, index)
        ).fetchone()
        return name, hidden, record

    def _choose(
        self, query: str, args: tuple[object, ...], rng: random.Random, empty: str
    ) -> RecordEntry:
        count = self._count(query, args)
        if count == 0:
            raise ValueError(empty)
        return self._nth(query, args, rng.randrange(count))

    def _pick_record(
        self, contract: str | None, rng: random.Random, empty: str, *, nonempty: bool = False
    ) -> RecordEntry:
        where, args = _scope(contract)
        if nonempty:
            where += " AND length(record) > 0"
        return self._choose(_RECORDS + where, args, rng, empty)

    def _pick_history(self, contract: str | None, rng: random.Random, scope: str) -> RecordEntry:
        """A key's previous record that differs from what the key holds now."""
        where, args = _scope(contract, "h.")
        query = (
            "SELECT h.contract, h.hidden, h.record FROM history h LEFT JOIN records r "
            "ON r.contract = h.contract AND r.hidden = h.hidden"
            + where
            + " AND r.record IS NOT h.record"
        )
        empty = f"nothing to roll back: no overwritten record to put back in {scope}"
        return self._choose(query, args, rng, empty)

    def _has_checkpoint(self, seq: int) -> bool:
        found = self._db.execute("SELECT 1 FROM checkpoints WHERE seq = ?", (seq,)).fetchone()
        return found is not None

    def _drop_checkpoint(self, seq: int) -> None:
        self._db.execute("DELETE FROM checkpoints WHERE seq = ?", (seq,))
        self._db.execute("DELETE FROM checkpoint_records WHERE seq = ?", (seq,))

    def _prune_checkpoints(self) -> None:
        for table in ("checkpoint_records", "checkpoints"):
            self._db.execute(
                f"DELETE FROM {table} WHERE seq NOT IN "
                "(SELECT seq FROM checkpoints ORDER BY seq DESC LIMIT ?)",
                (KEEP_CHECKPOINTS,),
            )


_RECORDS = "SELECT contract, hidden, record FROM records"


def _scope(contract: str | None, prefix: str = "") -> tuple[str, tuple[object, ...]]:
    """A WHERE clause for one contract's rows (or all), to extend with AND."""
    if contract is None:
        return " WHERE 1", ()
    return f" WHERE {prefix}contract = ?", (contract,)


def _check_batch(contract: str, items: Iterable[tuple[bytes, bytes | None]]) -> None:
    """The wire's limits, for records that reach the store another way."""
    check_contract(contract)
    for hidden, record in items:
        check_hidden(hidden)
        if record is not None:
            check_record(record)


__all__ = ["FILE_NAME", "KEEP_CHECKPOINTS", "CacheStats", "ContractStore", "TamperMode"]
