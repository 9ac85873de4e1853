"""The service enclave's internal cache hash table over contract state (issue 14, S4).

Why a cache at all: a miss leaves the enclave (a round trip to the host, then AEAD and digest
checks), which costs far more than executing a small contract call, so the plaintext entries
most calls touch are kept inside the enclave. Why bounded twice: entries bound the table's
overhead, bytes bound the enclave memory the values take (Oasis keeps both limits).

What a caller sees:

* ``ContractCache.call(contract)`` opens one call's ``CallView``. Its writes go to a private
  overlay and its reads see the overlay first, then the cache, then the backing. Only
  ``commit`` lets the writes into the cache; ``abort`` (a trap, a revert) throws them away, so a
  failed call leaves none of its writes in the cache nor in the backing. Values a call *read*
  from the backing are committed state and stay cached whatever becomes of the call.
* Committed writes are **dirty** and pinned (never evicted) until written back. Write-back is
  one batch per ``flush_every`` committed calls (one ``Backing.store`` per contract, keys in
  sorted order so the batch tells the host nothing about the order of the writes), or at once
  on ``flush()`` / ``drop()``; the count of calls starts again at every write-back, early
  ones included.
* The bounds are strict: after every operation that returns, the table has at most
  ``max_entries`` entries and ``max_bytes`` bytes (``len(key) + len(value)`` per entry; the
  contract name is not counted). Clean entries are evicted least recently used first. If the
  pinned (dirty) entries alone break a bound, the whole dirty set is written back early, which
  unpins it, and eviction goes on: writes reach the backing sooner, never later, and the bound
  holds. A value read from the backing that would only fit by an early write-back is returned
  but not cached. The one exception: a failing ``Backing.store`` leaves its entries dirty (to
  be retried by the next flush) and may leave the table over its bounds until then.
* ``max_entries=0`` is no cache at all: every read goes to the backing and a committed call's
  writes are written through at its commit (and then forgotten, not counted as evictions).
* "Absent" is cached too (a negative entry of ``len(key)`` bytes), so a read of a missing key
  costs one miss, not one per read. Reads of the call's own writes are counted apart
  (``overlay_reads``), neither hit nor miss.

The modelled EPC (enclave page cache, ``kmnode.contracts.epc``): SGX keeps enclave memory in
a small protected region and pages it out, encrypted, when the enclave outgrows it; swapping a
page back in costs about 40,000 cycles. The cache reports every operation on its table (hit,
miss, insert, committed write, write-back, eviction walk, removal, drop) to a ``TableLayout``,
the table as a native enclave would lay it out (bucket array, nodes with LRU and chain links,
a slab-style allocator), which touches the 4 KiB pages that operation would touch in an
``EpcModel`` holding ``epc_budget_bytes`` of resident pages, LRU. A touch of a page that is not
resident adds ``page_swap_cycles`` to ``modelled_swap_cycles`` and one to
``modelled_page_faults``; a resident page costs nothing, so a table that fits the budget pays
only its first touches, and one past it pays more the further past it is. The counts
are deterministic, so nodes and runs agree; a benchmark turns them into time to show the cliff
of a cache that outgrows enclave memory. ``max_entries=0`` has no table: nothing is charged.

Not thread-safe, and one call at a time: the service enclave executes committed calls in log
order, and a second open call could not see the first's writes. The cache holds contract state,
not secrets, but no repr or error message here shows a key or a value (counts only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kmnode.contracts.epc import EpcModel, Slot, TableLayout
from kmnode.contracts.storage import Backing, check_key, check_value


class CacheConfigError(ValueError):
    """A ``CacheConfig`` with a negative bound or a zero flush interval."""


class CallClosedError(RuntimeError):
    """A ``CallView`` used after its commit or abort: its overlay is gone."""


class CallOpenError(RuntimeError):
    """A second call opened while one is still open (calls run one at a time, in log order)."""


@dataclass(frozen=True)
class CacheConfig:
    """The cache's bounds, write-back cadence and EPC model (see the module docstring)."""

    max_entries: int = 4096
    max_bytes: int = 16 << 20
    flush_every: int = 64
    epc_budget_bytes: int = 64 << 20
    page_swap_cycles: int = 40_000

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes", "epc_budget_bytes", "page_swap_cycles"):
            if getattr(self, name) < 0:
                raise CacheConfigError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.flush_every < 1:
            raise CacheConfigError(f"flush_every must be 1 or more, not {self.flush_every}")


@dataclass(frozen=True)
class CacheStats:
    """Monotonic counters since the cache was made, and its current sizes."""

    hits: int
    misses: int
    overlay_reads: int
    evictions: int
    flushes: int
    drops: int
    committed_calls: int
    aborted_calls: int
    modelled_swap_cycles: int
    modelled_page_faults: int
    modelled_footprint_bytes: int
    entries: int
    bytes: int
    dirty: int
    dirty_bytes: int

    @property
    def hit_ratio(self) -> float:
        """Hits over cache lookups (overlay reads excluded); 0.0 before any lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class Cached:
    """What the table holds for one key, for tests and diagnostics (``None``: cached absent)."""

    value: bytes | None
    dirty: bool

    def __repr__(self) -> str:
        size = "absent" if self.value is None else f"{len(self.value)} bytes"
        return f"Cached({size}, dirty={self.dirty})"


@dataclass(slots=True)
class _Entry:
    value: bytes | None
    size: int
    dirty: bool

    def __repr__(self) -> str:
        return f"_Entry(size={self.size}, dirty={self.dirty})"


def _size(key: bytes, value: bytes | None) -> int:
    return len(key) + (0 if value is None else len(value))


class ContractCache:
    """The internal cache hash table: an LRU of plaintext entries in front of a ``Backing``."""

    def __init__(self, config: CacheConfig, backing: Backing) -> None:
        self._config = config
        self._backing = backing
        self._table: OrderedDict[Slot, _Entry] = OrderedDict()
        self._bytes = 0
        self._dirty: set[Slot] = set()
        self._dirty_bytes = 0
        self._calls_since_flush = 0
        self._open: CallView | None = None
        self._hits = self._misses = self._overlay_reads = self._evictions = 0
        self._flushes = self._drops = self._committed = self._aborted = 0
        self._epc = EpcModel(config.epc_budget_bytes, config.page_swap_cycles)
        self._layout = TableLayout(config.max_entries, self._epc) if config.max_entries else None

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def stats(self) -> CacheStats:
        """A snapshot: later activity does not change a ``CacheStats`` already taken."""
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            overlay_reads=self._overlay_reads,
            evictions=self._evictions,
            flushes=self._flushes,
            drops=self._drops,
            committed_calls=self._committed,
            aborted_calls=self._aborted,
            modelled_swap_cycles=self._epc.cycles,
            modelled_page_faults=self._epc.faults,
            modelled_footprint_bytes=0 if self._layout is None else self._layout.footprint_bytes,
            entries=len(self._table),
            bytes=self._bytes,
            dirty=len(self._dirty),
            dirty_bytes=self._dirty_bytes,
        )

    def __repr__(self) -> str:
        return (
            f"ContractCache(entries={len(self._table)}/{self._config.max_entries}, "
            f"bytes={self._bytes}/{self._config.max_bytes}, dirty={len(self._dirty)})"
        )

    def call(self, contract: str) -> CallView:
        """Begin one call of ``contract``: its reads and writes go through the returned view."""
        if self._open is not None:
            raise CallOpenError("a contract call is already open: commit or abort it first")
        view = CallView(self, contract)
        self._open = view
        return view

    @contextmanager
    def calling(self, contract: str) -> Iterator[CallView]:
        """``call`` for a ``with`` block: a call left open by the block (it raised, or did not
        commit) is aborted, so an exception never leaves a call half open."""
        view = self.call(contract)
        try:
            yield view
        finally:
            if view.is_open:
                view.abort()

    def cached(self, contract: str, key: bytes) -> Cached | None:
        """What the table holds for a key, without counting an access or touching LRU order."""
        entry = self._table.get((contract, key))
        return None if entry is None else Cached(entry.value, entry.dirty)

    def flush(self) -> None:
        """Write every dirty entry back now: one ``store`` per contract, contracts and keys in
        sorted order. A contract whose ``store`` raises keeps its entries dirty (the next flush
        retries them); the exception propagates."""
        self._calls_since_flush = 0
        if not self._dirty:
            return
        batches: dict[str, dict[bytes, bytes | None]] = {}
        dirty = sorted(self._dirty)
        for contract, key in dirty:
            batches.setdefault(contract, {})[key] = self._table[(contract, key)].value
        if self._layout is not None:
            self._layout.write_back(dirty)
        for contract, writes in batches.items():
            self._backing.store(contract, writes)
            for key in writes:
                slot = (contract, key)
                entry = self._table[slot]
                entry.dirty = False
                self._dirty.discard(slot)
                self._dirty_bytes -= entry.size
        self._flushes += 1

    def drop(self) -> None:
        """Forget every entry (the committed root disagreed with the enclave's, so nothing
        cached can be trusted to match it): dirty entries are written back first, as committed
        state must not be lost. The next reads go to the backing."""
        self.flush()
        self._table.clear()
        self._bytes = 0
        if self._layout is not None:
            self._layout.clear()
        self._drops += 1

    # What a CallView calls.

    def _read(self, contract: str, key: bytes) -> bytes | None:
        slot = (contract, key)
        entry = self._table.get(slot)
        if entry is not None:
            self._hits += 1
            self._table.move_to_end(slot)
            if self._layout is not None:
                self._layout.hit(slot)
            return entry.value
        self._misses += 1
        if self._layout is not None:
            self._layout.miss(slot)
        value = self._backing.load(contract, key)
        if value is not None:
            check_value(value)
        self._admit(slot, value)
        return value

    def _overlay_read(self) -> None:
        self._overlay_reads += 1

    def _commit(self, contract: str, writes: dict[bytes, bytes | None]) -> None:
        self._open = None
        self._committed += 1
        for key, value in writes.items():
            self._put_dirty((contract, key), value)
        self._calls_since_flush += 1
        if self._calls_since_flush >= self._config.flush_every or self._config.max_entries == 0:
            self.flush()
        self._enforce_bounds()

    def _abort(self) -> None:
        self._open = None
        self._aborted += 1

    # The table.

    def _over(self) -> bool:
        return len(self._table) > self._config.max_entries or self._bytes > self._config.max_bytes

    def _admit(self, slot: Slot, value: bytes | None) -> None:
        """Cache a value just loaded, if it fits once every clean entry could be evicted."""
        size = _size(slot[1], value)
        fits_entries = len(self._dirty) + 1 <= self._config.max_entries
        if not fits_entries or self._dirty_bytes + size > self._config.max_bytes:
            return
        self._table[slot] = _Entry(value, size, dirty=False)
        self._bytes += size
        if self._layout is not None:
            self._layout.insert(slot, size)
        self._evict_clean()

    def _put_dirty(self, slot: Slot, value: bytes | None) -> None:
        size = _size(slot[1], value)
        old = self._table.get(slot)
        if old is not None:
            self._bytes -= old.size
            if old.dirty:
                self._dirty_bytes -= old.size
            self._table.move_to_end(slot)
        self._table[slot] = _Entry(value, size, dirty=True)
        self._bytes += size
        if self._layout is not None:
            self._layout.write(slot, size)
        self._dirty.add(slot)
        self._dirty_bytes += size

    def _enforce_bounds(self) -> None:
        self._evict_clean()
        if self._over():
            # The pinned entries alone break a bound: write them back early to unpin them.
            self.flush()
            self._evict_clean()

    def _evict_clean(self) -> None:
        """Evict clean entries, least recently used first, until within both bounds (or only
        dirty entries are left)."""
        excess_entries = len(self._table) - self._config.max_entries
        excess_bytes = self._bytes - self._config.max_bytes
        if excess_entries <= 0 and excess_bytes <= 0:
            return
        victims, visited = [], []
        for slot, entry in self._table.items():
            if excess_entries <= 0 and excess_bytes <= 0:
                break
            visited.append(slot)
            if entry.dirty:
                continue
            victims.append(slot)
            excess_entries -= 1
            excess_bytes -= entry.size
        if self._layout is not None:
            self._layout.scan(visited)
        for slot in victims:
            self._bytes -= self._table.pop(slot).size
            if self._layout is not None:
                self._layout.remove(slot)
        if self._config.max_entries:  # without a cache, a written-through entry is not evicted
            self._evictions += len(victims)


class CallView:
    """One contract call's view of its contract's keys: a ``Storage`` with a private overlay.

    Keys and values are checked against the storage limits before anything is read or written;
    a refused one raises ``StorageLimitError`` and changes nothing.
    """

    def __init__(self, cache: ContractCache, contract: str) -> None:
        self._cache = cache
        self._contract = contract
        self._writes: dict[bytes, bytes | None] = {}
        self._open = True

    @property
    def contract(self) -> str:
        return self._contract

    @property
    def is_open(self) -> bool:
        return self._open

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"CallView({self._contract!r}, {state}, writes={len(self._writes)})"

    def get(self, key: bytes) -> bytes | None:
        self._check_open()
        check_key(key)
        if key in self._writes:
            self._cache._overlay_read()
            return self._writes[key]
        return self._cache._read(self._contract, key)

    def set(self, key: bytes, value: bytes) -> None:
        self._check_open()
        check_key(key)
        check_value(value)
        self._writes[key] = bytes(value)

    def delete(self, key: bytes) -> None:
        self._check_open()
        check_key(key)
        self._writes[key] = None

    def commit(self) -> None:
        """The call succeeded: its writes enter the cache, dirty and pinned until written back.
        The view is closed even if a write-back this triggers raises (the writes stay dirty)."""
        self._check_open()
        self._open = False
        writes, self._writes = self._writes, {}
        self._cache._commit(self._contract, writes)

    def abort(self) -> None:
        """The call trapped or reverted: its writes are discarded, nothing of them remains."""
        self._check_open()
        self._open = False
        self._writes = {}
        self._cache._abort()

    def _check_open(self) -> None:
        if not self._open:
            raise CallClosedError(f"the call of {self._contract!r} was committed or aborted")
