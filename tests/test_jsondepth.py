"""The nesting bound that runs before any JSON parser: never shallower than the truth."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kmnode.jsondepth import deeper_than
from kmnode.km.commands import MAX_COMMAND_DEPTH, CommandRefused, parse

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab[]{}"\\', max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=1000, deadline=None)
@given(value=JSON, limit=st.integers(0, 8))
@example(value=["]", [[[]]]], limit=3)  # a closing bracket in a string closes nothing
@example(value=['\\"]', [[[]]]], limit=3)  # nor after an escaped backslash
def test_a_text_deeper_than_the_limit_is_always_caught(value: Any, limit: int) -> None:
    text = json.dumps(value)
    if depth(value) > limit:
        assert deeper_than(text, limit) and deeper_than(text.encode(), limit)


def test_a_shallow_text_with_many_brackets_passes_and_a_deep_one_does_not() -> None:
    flat = json.dumps([[1]] * 100)  # 101 opening brackets, 2 levels
    assert not deeper_than(flat, 2) and deeper_than(flat, 1)
    assert deeper_than("[" * 33, 32) and not deeper_than("[" * 32, 32)


def test_a_command_nested_too_deep_is_refused_before_parsing() -> None:
    levels = MAX_COMMAND_DEPTH + 1
    data = b'{"op":"key.create","name":' + b"[" * levels + b"]" * levels + b"}"
    with pytest.raises(CommandRefused) as refused:
        parse(data)
    assert str(refused.value) == f"command is nested deeper than {MAX_COMMAND_DEPTH}"
