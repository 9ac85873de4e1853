"""Commands forwarded to the leader travel in batches that stay under the peer frame limit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consensus.types import Entry, EntryType
from kmnode.km.forwarding import split_by_size


def command(size: int) -> Entry:
    return Entry(0, 0, EntryType.NORMAL, b"c" * size)


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=60), st.integers(1, 1000))
def test_batches_keep_order_and_respect_the_limit(sizes: list[int], limit: int) -> None:
    entries = [command(n) for n in sizes]
    batches = split_by_size(entries, limit)
    assert [e for batch in batches for e in batch] == entries
    for batch in batches:
        assert batch
        assert len(batch) == 1 or sum(len(e.data) for e in batch) <= limit


def test_one_turn_of_outcomes_is_one_message() -> None:
    assert len(split_by_size([command(200)] * 100, 1 << 20)) == 1
    assert [len(b) for b in split_by_size([command(600)] * 5, 1000)] == [1, 1, 1, 1, 1]
