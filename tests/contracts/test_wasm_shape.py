"""Which modules the VM may keep an instance of between calls: only those that can keep
nothing but their memory (which the VM puts back before every call)."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime
from hypothesis import given
from hypothesis import strategies as st

from kmnode.contracts.wasm_shape import WASM_HEADER, resettable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "contracts"


def wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.mark.parametrize("name", ["token", "counter"])
def test_the_examples_keep_nothing_but_memory(name: str) -> None:
    assert resettable(wasm((EXAMPLES / f"{name}.wat").read_text()))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("(module (memory 1) (global (mut i32) (i32.const 0)))", "a mutable global"),
        ('(module (memory 1) (data "x"))', "a passive data segment"),
        ("(module (memory 1) (table 1 funcref))", "a table"),
        ("(module (memory 1) (table 1 funcref) (elem (i32.const 0) func))", "elements"),
        ("(module)", "no memory"),
        ('(module (import "env" "m" (memory 1)))', "an imported memory"),
        ('(module (import "env" "g" (global i32)) (memory 1))', "an imported global"),
    ],
)
def test_modules_that_could_keep_state_are_not_kept(text: str, why: str) -> None:
    assert not resettable(wasm(text)), why


def test_immutable_globals_and_active_data_are_fine() -> None:
    text = '(module (memory 1) (global i32 (i32.const 11)) (data (i32.const 0) "hi"))'
    assert resettable(wasm(text))


@given(st.binary(max_size=300))
def test_any_bytes_get_an_answer_never_an_exception(data: bytes) -> None:
    assert resettable(WASM_HEADER + data) in (True, False)
    assert resettable(data) in (True, False)


def test_a_truncated_module_is_not_kept() -> None:
    binary = wasm((EXAMPLES / "token.wat").read_text())
    for cut in range(len(WASM_HEADER) + 1, len(binary), 97):
        resettable(binary[:cut])  # never raises; whatever it says, the VM checks the module
