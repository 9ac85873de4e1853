"""Data operations in WebAssembly (issue 15): the variance example gives the variance; what
a hostile or broken module does ends ``op-failed``, never a result; small groups are refused
before the code runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.contracts.vm import ContractVM
from kmnode.dataauth.ops import Limits, OpRefused
from kmnode.dataauth.table import parse_table
from kmnode.dataauth.wasm_op import checksum, run_wasm_op, validate_wasm_params

VARIANCE = bytes(
    wasmtime.wat2wasm(
        (Path(__file__).resolve().parents[2] / "examples/dataops/variance.wat").read_text()
    )
)
VM = ContractVM()


def table(values: list[float]) -> bytes:
    return ("x,y\n" + "".join(f"{v!r},1\n" for v in values)).encode()


def module(body: str, imports: str = "") -> bytes:
    return bytes(wasmtime.wat2wasm(f'(module {imports} (memory (export "memory") 1) {body})'))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=5, max_size=300))
def test_the_variance_example_computes_the_population_variance(values: list[float]) -> None:
    result = run_wasm_op(VM, VARIANCE, "variance", 1, parse_table(table(values)),
                         {"column": "x"}, Limits())  # fmt: skip
    decoded = json.loads(result)
    assert decoded["op"] == "variance" and decoded["version"] == 1
    assert decoded["value"] == pytest.approx(statistics.pvariance(values), rel=1e-9, abs=1e-6)


def test_a_small_group_is_refused_before_the_code_runs() -> None:
    with pytest.raises(OpRefused) as refused:
        run_wasm_op(VM, VARIANCE, "variance", 1, parse_table(table([1.0, 2.0])),
                    {"column": "x"}, Limits(min_group_size=5))  # fmt: skip
    assert refused.value.reason == "group-too-small"


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (module('(func (export "run") (result i32) (loop $l (br $l)) (i32.const 0))'), "trapped"),
        (module('(func (export "run") (result i32) (i32.const 7))'), "reverted"),
        (module('(func (export "go") (result i32) (i32.const 0))'), "run"),
        (
            module(
                '(func (export "run") (result i32) (call $w (i32.const 0) (i32.const 1) '
                "(i32.const 0) (i32.const 1)) (i32.const 0))",
                '(import "env" "storage_write" (func $w (param i32 i32 i32 i32)))',
            ),
            "storage",
        ),
        (
            module(
                '(func (export "run") (result i32) '
                "(call $r (i32.const 0) (i32.const 3)) (i32.const 0))",
                '(import "env" "set_result" (func $r (param i32 i32)))',
            ),
            "one f64",
        ),
        (b"\0asm garbage", "valid"),
    ],
)
def test_a_broken_or_hostile_module_fails_without_a_result(code: bytes, why: str) -> None:
    with pytest.raises(OpRefused) as refused:
        run_wasm_op(VM, code, "op", 1, parse_table(table([1.0] * 10)), {"column": "x"}, Limits())
    assert refused.value.reason == "op-failed" and why in str(refused.value)


def test_parameters_name_one_column_and_nothing_else() -> None:
    assert validate_wasm_params({"column": "x"}) == {"column": "x"}
    for bad in ({}, {"column": "x", "extra": 1}, {"column": "no spaces"}, {"column": 3}):
        with pytest.raises(OpRefused):
            validate_wasm_params(bad)
    with pytest.raises(OpRefused) as refused:
        run_wasm_op(VM, VARIANCE, "variance", 1, parse_table(table([1.0] * 10)),
                    {"column": "nope"}, Limits())  # fmt: skip
    assert refused.value.reason == "bad-data"
    assert checksum(VARIANCE) == checksum(bytes(VARIANCE)) != checksum(VARIANCE + b"\0")
