"""The contract VM: what a contract can reach, what it costs, and that every node would do the
same thing with the same call (fuel, results, traps)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.contracts.sealed_state import TamperError
from kmnode.contracts.vm import MAX_CODE_BYTES, CallResult, ContractError, ContractVM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "contracts"
COUNTER = (EXAMPLES / "counter.wat").read_bytes()
TOKEN = (EXAMPLES / "token.wat").read_bytes()


class Overlay:
    """A call's writes over committed state, kept only if the call succeeded (what the
    executor does with the cache; here a dict)."""

    def __init__(self, committed: dict[bytes, bytes]) -> None:
        self.committed = committed
        self.writes: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.writes[key] if key in self.writes else self.committed.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: bytes) -> None:
        self.writes[key] = None


def run(
    vm: ContractVM,
    state: dict[bytes, bytes],
    code: bytes,
    function: str,
    args: bytes = b"",
    caller: str = "ann",
    fuel: int = 1_000_000,
) -> CallResult:
    overlay = Overlay(state)
    result = vm.call(code, function, args, caller, overlay, fuel)
    if result.status == "ok":
        for key, value in overlay.writes.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    return result


def amount(n: int, to: str) -> bytes:
    return struct.pack("<Q", n) + to.encode()


def test_a_counter_counts_and_says_so() -> None:
    vm, state = ContractVM(), {}
    results = [run(vm, state, COUNTER, "increment") for _ in range(3)]
    assert [r.status for r in results] == ["ok"] * 3
    assert [struct.unpack("<Q", r.result)[0] for r in results] == [1, 2, 3]
    assert results[0].events == (b"incremented",)
    assert state == {b"count": struct.pack("<Q", 3)}


def test_the_same_call_costs_the_same_fuel_everywhere() -> None:
    """Two engines (two nodes), the same calls on the same states: identical results."""
    first, second = ContractVM(), ContractVM()
    a: dict[bytes, bytes] = {}
    b: dict[bytes, bytes] = {}
    for _ in range(5):
        assert run(first, a, COUNTER, "increment") == run(second, b, COUNTER, "increment")
    assert a == b


def test_running_out_of_fuel_traps_at_the_budget_and_writes_nothing() -> None:
    vm, state = ContractVM(), {b"count": struct.pack("<Q", 7)}
    spun = run(vm, state, COUNTER, "spin", fuel=50_000)
    assert (spun.status, spun.error, spun.fuel_used) == ("trapped", "out of fuel", 50_000)
    assert run(vm, state, COUNTER, "increment", fuel=500).error == "out of fuel"
    assert state == {b"count": struct.pack("<Q", 7)}


def test_a_token_ledger_mints_transfers_and_reverts() -> None:
    vm, state = ContractVM(), {}
    assert run(vm, state, TOKEN, "init", caller="ann").status == "ok"
    assert run(vm, state, TOKEN, "init", caller="bob").code == 1  # initialised already
    assert run(vm, state, TOKEN, "mint", amount(100, "bob"), caller="bob").code == 5  # not owner
    assert run(vm, state, TOKEN, "mint", amount(100, "bob"), caller="ann").status == "ok"
    paid = run(vm, state, TOKEN, "transfer", amount(30, "cat"), caller="bob")
    assert paid.status == "ok" and struct.unpack("<Q", paid.result) == (70,)
    assert paid.events == (b"transfer",)
    broke = run(vm, state, TOKEN, "transfer", amount(300, "cat"), caller="bob")
    assert (broke.status, broke.code) == ("reverted", 2)
    assert run(vm, state, TOKEN, "transfer", b"\x01", caller="bob").code == 3
    balances = {
        who: struct.unpack("<Q", run(vm, state, TOKEN, "balance", who.encode()).result)[0]
        for who in ("ann", "bob", "cat")
    }
    assert balances == {"ann": 0, "bob": 70, "cat": 30}


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (b"", "1 to"),
        (b"\0asm\x01\0\0\0garbage", "not a valid WebAssembly module"),
        (b"(module (func", "not a valid WebAssembly module"),
        (b'(module (import "wasi" "fd_write" (func)) (memory (export "memory") 1))',
         "only the host functions"),
        (b'(module (import "env" "open" (func)) (memory (export "memory") 1))',
         "imports env.open"),
        (b'(module (func (export "f") (result i32) (i32.const 0)))', "exports no memory"),
        (b"(module " + b" " * MAX_CODE_BYTES + b")", "1 to"),
    ],
)  # fmt: skip
def test_a_contract_that_could_reach_outside_its_storage_is_refused(
    code: bytes, reason: str
) -> None:
    with pytest.raises(ContractError, match=reason):
        ContractVM().check(code)


def test_a_call_that_cannot_start_is_refused_and_a_good_contract_has_an_id() -> None:
    vm = ContractVM()
    assert len(vm.check(COUNTER)) == 64
    with pytest.raises(ContractError, match="no function 'nope'"):
        vm.call(COUNTER, "nope", b"", "ann", Overlay({}))
    with pytest.raises(ContractError, match="no function 'memory'"):
        vm.call(COUNTER, "memory", b"", "ann", Overlay({}))
    with pytest.raises(ContractError, match="fuel is 1 to"):
        vm.call(COUNTER, "get", b"", "ann", Overlay({}), fuel=0)
    typed = (
        b'(module (memory (export "memory") 1)'
        b' (func (export "f") (param i32) (result i32) (i32.const 0)))'
    )
    with pytest.raises(ContractError, match="must take nothing and return an i32"):
        vm.call(typed, "f", b"", "ann", Overlay({}))


HOSTILE = b"""(module
  (import "env" "storage_write" (func $w (param i32 i32 i32 i32)))
  (import "env" "set_result" (func $r (param i32 i32)))
  (import "env" "emit" (func $e (param i32 i32)))
  (import "env" "args_copy" (func $a (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "args_outside") (result i32) (drop (call $a (i32.const 65535) (i32.const 100)))
    (i32.const 0))
  (func (export "args_negative") (result i32) (drop (call $a (i32.const -4) (i32.const 100)))
    (i32.const 0))
  (func $write (param $key i32) (param $len i32) (result i32)
    (call $w (local.get $key) (local.get $len) (i32.const 0) (i32.const 1)) (i32.const 0))
  (func (export "outside") (result i32) (call $write (i32.const 65530) (i32.const 100)))
  (func (export "long_key") (result i32) (call $write (i32.const 0) (i32.const 300)))
  (func (export "negative") (result i32) (call $write (i32.const 0) (i32.const -1)))
  (func (export "huge_result") (result i32) (call $r (i32.const 0) (i32.const 65537)) (i32.const 0))
  (func (export "many_events") (result i32)
    (local $i i32)
    (loop $l
      (call $e (i32.const 0) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 20))))
    (i32.const 0))
  (func (export "grow") (result i32) (memory.grow (i32.const 1000)))
  (func (export "divide") (result i32) (i32.div_u (i32.const 1) (i32.const 0))))"""


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("outside", "host refused: a storage key lies outside the contract's memory"),
        ("long_key", "host refused: a storage key of 300 bytes (at most 256)"),
        ("negative", "host refused: a storage key of -1 bytes"),
        ("huge_result", "host refused: a result of 65537 bytes"),
        ("many_events", "host refused: more than 16 events"),
        ("args_outside", "host refused: a copy into the contract's memory lies outside it"),
        ("args_negative", "host refused: a copy into the contract's memory lies outside it"),
    ],
)
def test_a_host_function_refuses_what_it_must_and_the_call_traps(function: str, error: str) -> None:
    state: dict[bytes, bytes] = {}
    result = run(ContractVM(), state, HOSTILE, function, b"some arguments")
    assert result.status == "trapped" and result.error.startswith(error), result
    assert state == {}


def test_memory_is_capped_and_a_wasm_trap_is_a_result() -> None:
    vm = ContractVM()
    grown = run(vm, {}, HOSTILE, "grow")  # 1000 pages = 64 MiB > 16 MiB: refused, not granted
    assert (grown.status, grown.code) == ("reverted", -1)
    divided = run(vm, {}, HOSTILE, "divide")
    assert divided.status == "trapped" and "divide by zero" in divided.error


def test_a_result_is_not_in_its_repr() -> None:
    result = run(ContractVM(), {}, COUNTER, "increment")
    assert result.result not in repr(result).encode() and "8 bytes" in repr(result)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["mint", "transfer", "balance"]),
        st.sampled_from(["ann", "bob", "cat"]),
        st.integers(0, 2**64 - 1) | st.integers(0, 200),
        st.sampled_from(["ann", "bob", "cat"]),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_token_calls_match_a_plain_model_and_cost_the_same_on_two_engines(
    ops: list[tuple[str, str, int, str]],
) -> None:
    """Any sequence of calls: both engines give identical results (fuel included), one keeping
    its instance between calls and one instantiating afresh for each, and the balances are
    those of a few lines of Python."""
    engines = [ContractVM(), ContractVM()]
    engines[1].reuse_instances = False
    states: list[dict[bytes, bytes]] = [{}, {}]
    for vm, state in zip(engines, states, strict=True):
        assert run(vm, state, TOKEN, "init", caller="ann").status == "ok"
    model = {"ann": 0, "bob": 0, "cat": 0}
    for function, caller, value, other in ops:
        args = other.encode() if function == "balance" else amount(value, other)
        first, second = (
            run(vm, s, TOKEN, function, args, caller) for vm, s in zip(engines, states, strict=True)
        )
        assert first == second
        if function == "mint":
            ok = caller == "ann" and model[other] + value < 2**64
            if ok:
                model[other] += value
        elif function == "transfer":
            ok = model[caller] >= value
            if ok:
                model[caller] -= value
                model[other] += value
                # It answers what the caller has left (all of it, if it paid itself).
                assert struct.unpack("<Q", first.result) == (model[caller],)
        else:
            ok = True
            assert struct.unpack("<Q", first.result) == (model[other],)
        assert (first.status == "ok") == ok, (function, caller, value, other, first)
    assert states[0] == states[1]


#: A contract that leaves things in its memory, and grows it: a kept instance must show the
#: next call the memory of a fresh one.
LEAKY = b"""
(module
  (import "env" "set_result" (func $set_result (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "clean")
  (func (export "poke") (result i32)
    (i32.store8 (i32.const 100) (i32.const 42))
    (i32.store8 (i32.const 200) (i32.const 88)) (i32.const 0))
  (func (export "grow") (result i32)
    (drop (memory.grow (i32.const 1)))
    (i32.store8 (i32.const 100) (i32.const 7)) (i32.const 0))
  (func (export "peek") (result i32)
    (i32.store8 (i32.const 0) (i32.wrap_i64 (i64.extend_i32_u (memory.size))))
    (call $set_result (i32.const 0) (i32.const 1))
    (call $set_result (i32.const 99) (i32.const 107)) (i32.const 0)))
"""


@pytest.mark.parametrize("reuse", [True, False])
def test_nothing_a_call_leaves_in_memory_reaches_the_next(reuse: bool) -> None:
    vm = ContractVM()
    vm.reuse_instances = reuse
    state: dict[bytes, bytes] = {}
    fresh = run(vm, state, LEAKY, "peek")
    for poke in ("poke", "grow", "poke"):
        assert run(vm, state, LEAKY, poke).status == "ok"
        after = run(vm, state, LEAKY, "peek")
        assert after == fresh, poke
    assert fresh.result[1] == 0 and fresh.result[101:106] == b"clean"


class Broken(Overlay):
    def get(self, key: bytes) -> bytes | None:
        raise TamperError("flipped", "the record does not authenticate")


def test_a_storage_failure_is_raised_not_a_result() -> None:
    """State the host tampered with: nothing the call computed from it may come out."""
    with pytest.raises(TamperError, match="flipped"):
        ContractVM().call(COUNTER, "increment", b"", "ann", Broken({}))
