"""The contract cache against a plain reference: random call sequences and cache configurations.

The reference is a dict per contract with a per-call overlay and no cache. Whatever the
configuration (no cache, one entry, a few, plenty; a few bytes or many; write-back after every
call, every 3 or every 64), every read returns the reference's value, the bounds hold after
every step, an aborted call changes nothing in the cache or the backing, committed writes
reach the backing within ``flush_every`` calls, and after a final flush the backing equals the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmnode.contracts.cache import CacheConfig, ContractCache
from tests.contracts import DictBacking

CONTRACTS = ("token", "counter", "vote")
KEYS = tuple(bytes([i]) * (1 + i % 5) for i in range(6))


@dataclass(frozen=True)
class Get:
    key: bytes


@dataclass(frozen=True)
class Set:
    key: bytes
    value: bytes


@dataclass(frozen=True)
class Delete:
    key: bytes


Op = Get | Set | Delete


@dataclass(frozen=True)
class Call:
    contract: str
    ops: tuple[Op, ...]
    commit: bool


@dataclass(frozen=True)
class Flush:
    """A step: write everything dirty back now."""


@dataclass(frozen=True)
class Drop:
    """A step: forget the cache (after writing back what is dirty)."""


Step = Call | Flush | Drop

keys = st.sampled_from(KEYS)
values = st.one_of(st.binary(max_size=12), st.builds(lambda n: b"v" * n, st.integers(0, 300)))
ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(Get, keys), st.builds(Set, keys, values), st.builds(Delete, keys)
)
calls = st.builds(
    Call, st.sampled_from(CONTRACTS), st.lists(ops, max_size=8).map(tuple), st.booleans()
)
steps: st.SearchStrategy[Step] = st.one_of(
    calls, calls, calls, calls, calls, calls, st.just(Flush()), st.just(Drop())
)
configs = st.builds(
    CacheConfig,
    max_entries=st.sampled_from([0, 1, 3, 10_000]),
    max_bytes=st.sampled_from([8, 40, 400, 16 << 20]),
    flush_every=st.sampled_from([1, 3, 64]),
    epc_budget_bytes=st.sampled_from([0, 100, 64 << 20]),
)


class Reference:
    """Contract state as a dict per contract: no cache, no write-back."""

    def __init__(self) -> None:
        self.state: dict[str, dict[bytes, bytes]] = {}

    def run(self, call: Call) -> list[bytes | None]:
        committed = self.state.get(call.contract, {})
        overlay: dict[bytes, bytes | None] = {}
        reads: list[bytes | None] = []
        for op in call.ops:
            if isinstance(op, Get):
                reads.append(overlay[op.key] if op.key in overlay else committed.get(op.key))
            elif isinstance(op, Set):
                overlay[op.key] = op.value
            else:
                overlay[op.key] = None
        if call.commit and overlay:
            table = dict(committed)
            for key, value in overlay.items():
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            if table:
                self.state[call.contract] = table
            else:
                self.state.pop(call.contract, None)
        return reads


def run_on_cache(cache: ContractCache, call: Call) -> list[bytes | None]:
    reads: list[bytes | None] = []
    with cache.calling(call.contract) as view:
        for op in call.ops:
            if isinstance(op, Get):
                reads.append(view.get(op.key))
            elif isinstance(op, Set):
                view.set(op.key, op.value)
            else:
                view.delete(op.key)
        if call.commit:
            view.commit()
        else:
            view.abort()
    return reads


def assert_bounds(cache: ContractCache) -> None:
    stats, config = cache.stats, cache.config
    assert stats.entries <= config.max_entries
    assert stats.bytes <= config.max_bytes
    assert stats.dirty <= stats.entries


def assert_cache_agrees(cache: ContractCache, reference: Reference) -> None:
    """Every cached entry, clean or dirty, holds the committed value (None: absent), and the
    sizes the cache reports are those of what it holds."""
    entries = dirty = size = dirty_size = 0
    for contract in CONTRACTS:
        for key in KEYS:
            cached = cache.cached(contract, key)
            if cached is not None:
                assert cached.value == reference.state.get(contract, {}).get(key)
                entries += 1
                dirty += cached.dirty
                size += len(key) + len(cached.value or b"")
                dirty_size += (len(key) + len(cached.value or b"")) * cached.dirty
    stats = cache.stats
    assert (stats.entries, stats.dirty, stats.bytes) == (entries, dirty, size)
    assert stats.dirty_bytes == dirty_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, program=st.lists(steps, min_size=10, max_size=60))
def test_the_cache_is_invisible_to_calls(config: CacheConfig, program: list[Step]) -> None:
    backing = DictBacking()
    cache = ContractCache(config, backing)
    reference = Reference()
    calls_since_backing_agreed = 0
    for step in program:
        before_backing = backing.snapshot()
        before_dirty = cache.stats.dirty
        if isinstance(step, Flush):
            cache.flush()
            assert backing.snapshot() == reference.state
        elif isinstance(step, Drop):
            cache.drop()
            assert backing.snapshot() == reference.state
            assert cache.stats.entries == 0
        else:
            assert run_on_cache(cache, step) == reference.run(step)
            if not step.commit:
                assert backing.snapshot() == before_backing
                assert cache.stats.dirty == before_dirty
            else:
                calls_since_backing_agreed += 1
        assert_bounds(cache)
        assert_cache_agrees(cache, reference)
        if cache.stats.dirty == 0:
            assert backing.snapshot() == reference.state
        if backing.snapshot() == reference.state:
            calls_since_backing_agreed = 0
        # Committed writes reach the backing by the flush_every-th committed call at the latest.
        assert calls_since_backing_agreed < config.flush_every
    cache.flush()
    assert backing.snapshot() == reference.state
    assert cache.stats.dirty == 0
    stats = cache.stats
    assert stats.committed_calls + stats.aborted_calls == sum(isinstance(s, Call) for s in program)
    if config.max_entries == 0:
        assert stats.hits == 0 and stats.entries == 0
