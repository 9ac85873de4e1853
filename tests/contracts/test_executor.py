"""The executor: with any cache configuration it does what a plain, uncached executor does, a
trapped or reverted call leaves nothing, and state the host tampered with stops it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.executor import Executor, ExecutorHalted
from kmnode.contracts.sealed_state import StateSealer
from kmnode.contracts.verified import MemoryHostStore, VerifiedBacking, state_root
from kmnode.contracts.vm import CallResult, ContractVM
from tests.contracts.test_vm import COUNTER, TOKEN, Overlay, amount

KEY = bytes(range(32))


def sealer(contract: str) -> StateSealer:
    return StateSealer(contract, KEY, 1)


def executor(config: CacheConfig) -> tuple[Executor, MemoryHostStore]:
    store = MemoryHostStore()
    ex = Executor(VerifiedBacking(store, sealer), config)
    ex.deploy("token", TOKEN)
    ex.deploy("counter", COUNTER)
    return ex, store


class Reference:
    """The same calls on plain dicts, one per contract: no cache, no sealing, no host."""

    def __init__(self) -> None:
        self.vm = ContractVM()
        self.code = {"token": TOKEN, "counter": COUNTER}
        self.state: dict[str, dict[bytes, bytes]] = {"token": {}, "counter": {}}

    def execute(self, contract: str, function: str, args: bytes, caller: str) -> CallResult:
        overlay = Overlay(self.state[contract])
        result = self.vm.call(self.code[contract], function, args, caller, overlay)
        if result.status == "ok":
            for key, value in overlay.writes.items():
                if value is None:
                    self.state[contract].pop(key, None)
                else:
                    self.state[contract][key] = value
        return result

    def roots(self) -> dict[str, bytes]:
        return {
            name: state_root(
                name, ((sealer(name).hide(k), sealer(name).digest(v)) for k, v in state.items())
            )
            for name, state in sorted(self.state.items())
        }


CONFIGS = st.builds(
    CacheConfig,
    max_entries=st.sampled_from([0, 1, 3, 4096]),
    max_bytes=st.sampled_from([64, 1 << 20]),
    flush_every=st.sampled_from([1, 3, 64]),
)
NAMES = st.sampled_from(["ann", "bob", "cat"])
CALLS = st.lists(
    st.one_of(
        st.tuples(st.just("token"), st.sampled_from(["mint", "transfer"]), NAMES,
                  st.integers(0, 150), NAMES),
        st.tuples(st.just("token"), st.just("balance"), NAMES, st.just(0), NAMES),
        st.tuples(st.just("counter"), st.sampled_from(["increment", "get"]), NAMES,
                  st.just(0), NAMES),
        st.tuples(st.just("counter"), st.just("spin"), NAMES, st.just(0), NAMES),
    ),
    max_size=30,
)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(config=CONFIGS, calls=CALLS)
def test_any_cache_configuration_gives_the_reference_results_and_roots(
    config: CacheConfig, calls: list[tuple[str, str, str, int, str]]
) -> None:
    ex, _ = executor(config)
    reference = Reference()
    assert ex.execute("token", "init", b"", "ann") == reference.execute("token", "init", b"", "ann")
    for contract, function, caller, value, other in calls:
        args = (
            amount(value, other)
            if function in ("mint", "transfer")
            else other.encode()
            if function == "balance"
            else b""
        )
        fuel = 20_000 if function == "spin" else 1_000_000
        got = ex.execute(contract, function, args, caller, fuel)
        expected = (
            reference.execute(contract, function, args, caller) if function != "spin" else None
        )
        if expected is not None:
            assert got == expected, (contract, function, caller, value, other)
        else:
            assert got.status == "trapped" and got.error == "out of fuel"
    assert ex.roots() == reference.roots()
    stats = ex.cache.stats
    assert stats.entries <= max(config.max_entries, stats.dirty)


def test_state_the_host_tampered_with_halts_the_executor() -> None:
    ex, store = executor(CacheConfig(max_entries=0, flush_every=1))
    assert ex.execute("token", "init", b"", "ann").status == "ok"
    assert ex.execute("token", "mint", amount(100, "bob"), "ann").status == "ok"
    bob = sealer("token").hide(b"b:bob")
    record = store.records[("token", bob)]
    flipped = store.records[("token", bob)] = record[:-1] + bytes([record[-1] ^ 1])
    with pytest.raises(ExecutorHalted, match="flipped"):
        ex.execute("token", "transfer", amount(10, "cat"), "bob")
    assert "tampered with" in ex.halted
    with pytest.raises(ExecutorHalted):
        ex.execute("counter", "get", b"", "ann")  # nothing runs until it is repaired
    # Nothing of the transfer was written: bob's record is as the host left it, cat has none.
    assert store.records[("token", bob)] == flipped
    assert ("token", sealer("token").hide(b"b:cat")) not in store.records
