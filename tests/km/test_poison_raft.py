"""Garbage committed through a real Raft group stops no driver, and every node agrees.

``test_state_poison`` shows one state refuses any command without raising; this drives the
same kind of entries (arbitrary bytes, and well-formed commands with wrong fields) through
three real Raft drivers on loopback TCP, each applying to its own KM state, as a malicious
member or a hostile host proposing them would: afterwards every driver still runs and commits,
and every node's state is byte-for-byte the same.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.types import Entry
from kmnode.km.commands import Applied
from kmnode.km.state import _HANDLERS, KMState, encode_command
from tests.consensus.test_driver import NAMES, Cluster, until
from tests.km.test_state import POLICY, member
from tests.km.test_state_poison import FIELDS, JSON


class StateOnly:
    """Raft's state machine for this test: the KM state alone (no enclave, no node hooks)."""

    def __init__(self) -> None:
        self.state = KMState()
        self.results: list[Applied] = []

    def apply(self, entry: Entry) -> object:
        result = self.state.apply(entry.index, entry.data)
        self.results.append(result)
        return result

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.state = KMState.restore(data)


OPS = sorted(kind.model_fields["op"].default for kind in _HANDLERS)
WRONG_COMMAND = st.builds(
    lambda op, fields: encode_command(op, **fields),
    st.sampled_from(OPS),
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5),
)
ENTRY = (
    st.binary(max_size=200)
    | WRONG_COMMAND
    | st.sampled_from(
        [
            b"",
            b"\xff" * 64,
            b"[" * 5000,
            b'{"op":"policy.set","policy":{"max_quote_age_s":NaN}}',
            b'{"op":"release.request","key":"db","node":"a","generation":true}',
            b'{"op":"key.create","name":"db","allowed_service":[' + b"9" * 4000 + b"]}",
        ]
    )
)
GENESIS = [
    encode_command("cluster.init", cluster="demo", policy=POLICY, member=member("a", 7101)),
    encode_command("key.create", name="db"),
]


async def commit_all(root: Path, entries: list[bytes]) -> None:
    cluster = Cluster(root, machine=StateOnly)
    try:
        for name in NAMES:
            await cluster.start(name)
        leader = await cluster.leader()
        for data in [*GENESIS, *entries]:
            result = await leader.propose(data)
            assert isinstance(result, Applied)
        # Still alive and committing after all of it: one more ordinary command goes through.
        ok = await leader.propose(encode_command("key.create", name="after"))
        assert isinstance(ok, Applied) and ok.ok, ok
        last = leader.applied_index
        await until(
            lambda: all(d.applied_index >= last for d in cluster.drivers.values()),
            10,
            "every node applied everything",
        )
        machines: dict[str, Any] = cluster.machines
        images = {hashlib.sha256(m.snapshot()).hexdigest() for m in machines.values()}
        assert len(images) == 1, "nodes disagree on the state"
        assert all(m.state.chain_hash == machines["a"].state.chain_hash for m in machines.values())
        assert "after" in machines["a"].state.keys
    finally:
        await cluster.close()
    assert not cluster.drivers


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(ENTRY, min_size=1, max_size=12))
def test_garbage_committed_through_raft_stops_no_driver_and_nodes_agree(
    tmp_path_factory: Any, entries: list[bytes]
) -> None:
    root = tmp_path_factory.mktemp("raft")
    asyncio.run(asyncio.wait_for(commit_all(root, entries), 60))
