"""The contract cache, case by case: LRU order, pinning, write-back cadence, drop, statistics,
the EPC model, the storage limits, and what its repr shows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from kmnode.contracts.cache import (
    CacheConfig,
    CacheConfigError,
    Cached,
    CallClosedError,
    CallOpenError,
    ContractCache,
)
from kmnode.contracts.storage import MAX_KEY_BYTES, MAX_VALUE_BYTES, StorageLimitError
from tests.contracts import DictBacking

BIG = 1 << 30


def config(**changes: int) -> CacheConfig:
    """A cache far from every bound and never flushing by itself, unless told otherwise."""
    base = {"max_entries": 1000, "max_bytes": BIG, "flush_every": 1000, "epc_budget_bytes": BIG}
    return CacheConfig(**(base | changes))


def seeded(**values: bytes) -> DictBacking:
    backing = DictBacking()
    backing.data["c"] = {k.encode(): v for k, v in values.items()}
    return backing


def read(cache: ContractCache, *keys: bytes, contract: str = "c") -> list[bytes | None]:
    with cache.calling(contract) as view:
        found = [view.get(key) for key in keys]
        view.commit()
    return found


def write(cache: ContractCache, contract: str = "c", **values: bytes | None) -> None:
    with cache.calling(contract) as view:
        for key, value in values.items():
            if value is None:
                view.delete(key.encode())
            else:
                view.set(key.encode(), value)
        view.commit()


# The overlay and abort.


def test_a_call_reads_its_own_writes_before_the_cache_and_the_backing() -> None:
    backing = seeded(a=b"old")
    cache = ContractCache(config(), backing)
    with cache.calling("c") as view:
        view.set(b"a", b"new")
        view.delete(b"b")
        assert view.get(b"a") == b"new"
        assert view.get(b"b") is None
        view.commit()
    assert backing.loads == []  # both reads were answered by the overlay
    assert cache.stats.overlay_reads == 2 and cache.stats.hits == cache.stats.misses == 0


def test_an_aborted_call_leaves_nothing_in_the_cache_nor_the_backing() -> None:
    backing = seeded(a=b"old")
    cache = ContractCache(config(flush_every=1), backing)
    with cache.calling("c") as view:
        assert view.get(b"a") == b"old"
        view.set(b"a", b"new")
        view.set(b"b", b"x")
        view.abort()
    cache.flush()
    assert backing.data == {"c": {b"a": b"old"}} and backing.stores == []
    assert cache.cached("c", b"a") == Cached(b"old", dirty=False)
    assert cache.cached("c", b"b") is None
    assert read(cache, b"a", b"b") == [b"old", None]
    assert cache.stats.aborted_calls == 1 and cache.stats.dirty == 0


def test_a_call_left_open_by_an_exception_is_aborted() -> None:
    backing = DictBacking()
    cache = ContractCache(config(flush_every=1), backing)
    with pytest.raises(ZeroDivisionError), cache.calling("c") as view:
        view.set(b"a", b"1")
        _ = 1 / 0
    assert cache.stats.aborted_calls == 1 and cache.cached("c", b"a") is None
    write(cache, a=b"2")  # the cache is usable again
    assert backing.data == {"c": {b"a": b"2"}}


def test_calls_run_one_at_a_time_and_a_closed_view_refuses_use() -> None:
    cache = ContractCache(config(), DictBacking())
    view = cache.call("c")
    with pytest.raises(CallOpenError):
        cache.call("d")
    view.commit()
    uses: list[Callable[[], object]] = [
        lambda: view.get(b"a"),
        lambda: view.set(b"a", b""),
        view.commit,
        view.abort,
    ]
    for use in uses:
        with pytest.raises(CallClosedError):
            use()
    cache.call("d").abort()


# LRU and the bounds.


def test_the_least_recently_used_clean_entry_is_evicted_first() -> None:
    cache = ContractCache(config(max_entries=2), seeded(a=b"1", b=b"2", c=b"3"))
    read(cache, b"a", b"b")
    read(cache, b"a")  # b is now the least recently used
    read(cache, b"c")
    assert cache.cached("c", b"b") is None
    assert cache.cached("c", b"a") is not None and cache.cached("c", b"c") is not None
    assert cache.stats.evictions == 1


def test_the_byte_bound_counts_keys_and_values() -> None:
    cache = ContractCache(config(max_bytes=10), seeded(a=b"1234", b=b"1234", c=b"12345678"))
    read(cache, b"a", b"b")  # 5 + 5 bytes: full
    assert cache.stats.bytes == 10 and cache.stats.entries == 2
    read(cache, b"c")  # 9 bytes: both others go
    assert cache.stats.bytes == 9 and cache.stats.entries == 1 and cache.stats.evictions == 2


def test_a_value_larger_than_the_byte_bound_is_returned_but_not_cached() -> None:
    backing = seeded(a=b"x" * 100)
    cache = ContractCache(config(max_bytes=50), backing)
    assert read(cache, b"a") == [b"x" * 100]
    assert read(cache, b"a") == [b"x" * 100]
    assert cache.stats.entries == 0 and cache.stats.misses == 2 and len(backing.loads) == 2


def test_absent_keys_are_cached_as_negative_entries() -> None:
    backing = DictBacking()
    cache = ContractCache(config(), backing)
    assert read(cache, b"nope") == [None]
    assert read(cache, b"nope") == [None]
    assert len(backing.loads) == 1 and cache.stats.hits == 1 and cache.stats.bytes == 4


# Pinning and write-back.


def test_dirty_entries_are_pinned_while_clean_ones_are_evicted() -> None:
    backing = seeded(r=b"0")
    cache = ContractCache(config(max_entries=3), backing)
    write(cache, a=b"1", b=b"2")
    read(cache, b"r")
    read(cache, b"s")  # a and b are older, but pinned: r goes
    assert cache.cached("c", b"r") is None
    assert cache.cached("c", b"a") == Cached(b"1", dirty=True)
    assert cache.cached("c", b"b") == Cached(b"2", dirty=True)
    assert backing.stores == []


def test_a_read_that_fits_only_by_writing_back_early_is_not_cached() -> None:
    backing = seeded(r=b"0")
    cache = ContractCache(config(max_entries=2), backing)
    write(cache, a=b"1", b=b"2")
    assert read(cache, b"r") == [b"0"]
    assert cache.cached("c", b"r") is None and backing.stores == []


def test_pinned_entries_beyond_a_bound_are_written_back_early() -> None:
    backing = DictBacking()
    cache = ContractCache(config(max_entries=2), backing)
    write(cache, a=b"1", b=b"2", c=b"3")  # three dirty entries in a cache of two
    assert backing.data == {"c": {b"a": b"1", b"b": b"2", b"c": b"3"}}
    stats = cache.stats
    assert stats.entries <= 2 and stats.dirty == 0 and stats.flushes == 1


def test_writes_are_written_back_every_flush_every_calls_in_one_batch_per_contract() -> None:
    backing = DictBacking()
    cache = ContractCache(config(flush_every=3), backing)
    write(cache, b=b"1")
    write(cache, "d", x=b"9")
    assert backing.stores == []
    write(cache, a=b"2", b=None)
    assert backing.stores == [("c", {b"a": b"2", b"b": None}), ("d", {b"x": b"9"})]
    assert list(backing.stores[0][1]) == [b"a", b"b"]  # sorted, not in the order written
    assert cache.stats.flushes == 1 and cache.stats.dirty == 0
    write(cache, a=b"3")
    write(cache)
    assert len(backing.stores) == 2
    cache.flush()
    assert backing.data == {"c": {b"a": b"3"}, "d": {b"x": b"9"}}
    cache.flush()  # nothing dirty: nothing sent
    assert len(backing.stores) == 3 and cache.stats.flushes == 2


def test_a_batch_is_sorted_so_the_host_cannot_learn_the_order_of_the_writes() -> None:
    backing = DictBacking()
    cache = ContractCache(config(), backing)
    names = [f"k{i:02}" for i in range(30)]
    for contract in ("z", "m", "a"):
        write(cache, contract, **{name: b"v" for name in reversed(names)})
    cache.flush()
    assert [contract for contract, _ in backing.stores] == ["a", "m", "z"]
    assert all(list(writes) == sorted(writes) for _, writes in backing.stores)


def test_a_failed_write_back_keeps_the_entries_dirty_for_the_next_flush() -> None:
    class Failing(DictBacking):
        fail = True

        def store(self, contract: str, writes: Mapping[bytes, bytes | None]) -> None:
            if self.fail:
                raise OSError("host unavailable")
            super().store(contract, writes)

    backing = Failing()
    cache = ContractCache(config(), backing)
    write(cache, a=b"1")
    with pytest.raises(OSError):
        cache.flush()
    assert cache.stats.dirty == 1 and read(cache, b"a") == [b"1"]
    backing.fail = False
    cache.flush()
    assert backing.data == {"c": {b"a": b"1"}} and cache.stats.dirty == 0


def test_without_a_cache_every_read_goes_to_the_backing_and_writes_go_through_at_commit() -> None:
    backing = seeded(a=b"1")
    cache = ContractCache(config(max_entries=0, flush_every=64), backing)
    assert read(cache, b"a", b"a") == [b"1", b"1"]
    assert len(backing.loads) == 2
    write(cache, a=b"2")
    assert backing.data == {"c": {b"a": b"2"}}
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.entries, stats.evictions) == (0, 2, 0, 0)


def test_drop_writes_back_then_forgets_everything() -> None:
    backing = seeded(a=b"1")
    cache = ContractCache(config(), backing)
    read(cache, b"a")
    write(cache, b=b"2")
    cache.drop()
    assert backing.data == {"c": {b"a": b"1", b"b": b"2"}}
    assert cache.stats.entries == 0 and cache.stats.bytes == 0 and cache.stats.drops == 1
    backing.data["c"][b"a"] = b"host's"  # what the backing says now is what a read sees
    assert read(cache, b"a") == [b"host's"]


# Statistics.


def test_stats_count_hits_misses_and_sizes_and_are_snapshots() -> None:
    cache = ContractCache(config(), seeded(a=b"12"))
    before = cache.stats
    read(cache, b"a", b"a", b"a", b"z")
    write(cache, b=b"xyz")
    stats = cache.stats
    assert before.hits == 0 and before.entries == 0
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 2, 3, 3 + 1 + 4)
    assert (stats.dirty, stats.dirty_bytes, stats.committed_calls) == (1, 4, 2)
    assert stats.hit_ratio == 0.5


# The EPC model (the page-level rules: test_epc.py).


def test_a_table_within_the_budget_pays_only_its_first_touches() -> None:
    keys = [f"k{i:02d}".encode() for i in range(40)]
    backing = seeded(**{key.decode(): b"v" * 100 for key in keys})
    cache = ContractCache(config(page_swap_cycles=100), backing)  # a 1 GiB budget
    read(cache, *keys)
    first = cache.stats
    assert 0 < first.modelled_page_faults <= first.modelled_footprint_bytes // 4096
    assert first.modelled_swap_cycles == 100 * first.modelled_page_faults
    for _ in range(5):  # hits, and writes in place, on pages that are in: free
        read(cache, *keys)
        with cache.calling("c") as view:
            for key in keys:
                view.set(key, b"w" * 100)
            view.commit()
    cache.flush()
    assert cache.stats.modelled_page_faults == first.modelled_page_faults


def test_past_the_budget_the_same_reads_fault_again() -> None:
    value = b"v" * 5000  # one node of two pages at least
    backing = seeded(a=value, b=value, c=value)
    cache = ContractCache(config(epc_budget_bytes=4 * 4096, page_swap_cycles=100), backing)
    read(cache, b"a", b"b", b"c")  # 6+ pages of nodes, a table header and a bucket page
    before = cache.stats.modelled_swap_cycles
    read(cache, b"a", b"b", b"c")  # each node was pushed out by the two read after it
    assert cache.stats.modelled_swap_cycles - before >= 3 * 2 * 100


# Limits and configuration.


@pytest.mark.parametrize(
    "act",
    [
        lambda view: view.get(b""),
        lambda view: view.get(b"k" * (MAX_KEY_BYTES + 1)),
        lambda view: view.set(b"k" * (MAX_KEY_BYTES + 1), b"v"),
        lambda view: view.set(b"k", b"v" * (MAX_VALUE_BYTES + 1)),
        lambda view: view.delete(b""),
    ],
    ids=["empty-get", "long-key-get", "long-key-set", "long-value", "empty-delete"],
)
def test_keys_and_values_beyond_the_limits_are_refused_and_change_nothing(act: object) -> None:
    backing = seeded(k=b"1")
    cache = ContractCache(config(flush_every=1), backing)
    with cache.calling("c") as view:
        with pytest.raises(StorageLimitError):
            act(view)  # type: ignore[operator]
        assert view.is_open
        view.commit()
    assert backing.loads == [] and backing.stores == [] and cache.stats.entries == 0


def test_the_longest_key_and_value_are_accepted() -> None:
    backing = DictBacking()
    cache = ContractCache(config(flush_every=1), backing)
    key, value = b"k" * MAX_KEY_BYTES, b"v" * MAX_VALUE_BYTES
    with cache.calling("c") as view:
        view.set(key, value)
        view.commit()
    assert backing.data == {"c": {key: value}}


def test_an_oversized_value_from_the_backing_is_refused_and_not_cached() -> None:
    cache = ContractCache(config(), seeded(a=b"v" * (MAX_VALUE_BYTES + 1)))
    with cache.calling("c") as view, pytest.raises(StorageLimitError):
        view.get(b"a")
    assert cache.stats.entries == 0


@pytest.mark.parametrize(
    "bad", [{"max_entries": -1}, {"max_bytes": -1}, {"flush_every": 0}, {"page_swap_cycles": -5}]
)
def test_a_config_out_of_range_is_refused(bad: dict[str, int]) -> None:
    with pytest.raises(CacheConfigError, match=next(iter(bad))):
        CacheConfig(**bad)


# repr.


def test_repr_shows_counts_never_keys_or_values() -> None:
    secret_key, secret_value = b"alice-balance", b"1000000-tokens"
    cache = ContractCache(config(), DictBacking())
    view = cache.call("token")
    view.set(secret_key, secret_value)
    shown = [repr(view)]
    view.commit()
    shown += [repr(cache), repr(cache.stats), repr(cache.cached("token", secret_key)), repr(view)]
    for text in shown:
        assert "alice" not in text and "1000000" not in text
    assert "entries=1" in repr(cache) and "dirty=1" in repr(cache)
