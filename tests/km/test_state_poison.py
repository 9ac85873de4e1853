"""A committed command of any shape is applied or refused, never raised, and a refusal changes
nothing but the chain: one bad entry must not stop the log on every node (and again after each
restart, since the entry replays)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.km.commands import Applied, Refused
from kmnode.km.state import _HANDLERS, KMState, encode_command
from tests.km.test_state import initialised, member, run

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
JSON = st.recursive(
    SCALARS | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
FIELDS = [
    "name", "key", "node", "generation", "member", "policy", "role", "measurement",
    "platform_id", "release", "status", "allowed_service", "cluster", "cluster_id", "index",
    "chain_hash", "public_key", "quote", "signature", "service_measurement",
]  # fmt: skip


def ready_state() -> KMState:
    state = initialised()
    run(state, encode_command("member.add", member=member("km2", 7102)))
    run(state, encode_command("key.create", name="db"))
    run(state, encode_command("release.request", key="db", node="km2"))
    return state


def image(state: KMState) -> dict[str, Any]:
    """The state without the fields every applied entry moves (index and chain)."""
    data = json.loads(state.snapshot())
    for moving in ("applied_index", "chain_hash"):
        data.pop(moving)
    return data


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(sorted(kind.model_fields["op"].default for kind in _HANDLERS)),
    fields=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5),
)
def test_any_fields_are_applied_or_refused_and_a_refusal_changes_nothing(
    op: str, fields: dict[str, Any]
) -> None:
    state = ready_state()
    before = image(state)
    result = state.apply(state.applied_index + 1, encode_command(op, **fields))
    assert isinstance(result, Applied)
    if not result.ok:
        assert image(state) == before, result


def test_poison_pills_from_the_hardening_issue_are_refused() -> None:
    state = ready_state()
    pills = [
        encode_command("policy.set", policy={"measurements": ["ab" * 32]}),
        b'{"op":"key.create","name":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"op":"policy.set","policy":{"max_quote_age_s":NaN}}',
        b'{"op":"policy.set","policy":{"max_quote_age_s":Infinity}}',
        encode_command("release.request", key="db", node="km2", generation=True),
    ]
    for pill in pills:
        before = image(state)
        result = state.apply(state.applied_index + 1, pill)
        assert isinstance(result, Refused), (pill[:60], result)
        assert image(state) == before
