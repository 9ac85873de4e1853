"""Snapshots of the KM state: the same bytes as ever, and an image that later applies cannot
change (the Raft driver serialises it in a thread while the node keeps applying)."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from kmnode.km.state import SNAPSHOT_CHUNK, KMState, Release, encode_command
from tests.km.test_state import SERVICE_OK, initialised, member, run


def with_releases(count: int) -> KMState:
    state = initialised()
    run(state, encode_command("member.add", member=member("km2", 7102)))
    run(state, encode_command("key.create", name="db"))
    for i in range(count):
        (request,) = run(state, encode_command("release.request", key="db", node="km2"))
        if i % 3:  # some stay requested
            status = "provisioned" if i % 2 else "refused"
            run(
                state,
                encode_command(
                    "release.outcome",
                    release=request.release,
                    node="km2",
                    status=status,
                    reason="" if i % 2 else 'no \u00e9nclave "here"',
                    service_measurement=SERVICE_OK,
                ),
            )
    return state


def reference_snapshot(state: KMState) -> bytes:
    """The snapshot encoding as one ``json.dumps`` (before snapshots were captured and chunked;
    restore reads it; a snapshot from before identities, without their three fields, too)."""
    data = {
        "cluster": state.cluster,
        "cluster_id": state.cluster_id,
        "genesis_hash": state.genesis_hash.hex(),
        "policy": state.policy.to_dict(),
        "keys": [dataclasses.asdict(k) for k in state.keys.values()],
        "members": [dataclasses.asdict(m) for m in state.members.values()],
        "releases": [dataclasses.asdict(r) for r in state.releases.values()],
        "applied_index": state.applied_index,
        "chain_hash": state.chain_hash.hex(),
        "last_signed_index": state.last_signed_index,
        "last_signature_entry": state.last_signature_entry,
        "identities": [i.model_dump(mode="json") for i in state.identities.values()],
        "requests": state.requests,
        "newest_request": state.newest_request,
        "proposals": [dataclasses.asdict(p) for p in state.proposals.values()],
        "threshold": state.threshold,
        "chaos_enabled": state.chaos_enabled,
        "admitted": [m.model_dump(mode="json") for m in state.admitted.values()],
        "denied": sorted(state.denied),
        "contracts": [dataclasses.asdict(c) for c in state.contracts.values()],
        "contract_seq": state.contract_seq,
        "contract_ops": [dataclasses.asdict(op) for op in state.contract_ops],
        "checkpoints": [dataclasses.asdict(c) for c in state.checkpoints],
        "data": state.data.to_json(),
        "recovery": state.recovery.capture(),
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("count", [0, 1, SNAPSHOT_CHUNK, 2 * SNAPSHOT_CHUNK + 7])
def test_snapshot_bytes_are_unchanged_and_restore(count: int) -> None:
    state = with_releases(count)
    blob = state.snapshot()
    assert blob == reference_snapshot(state)
    restored = KMState.restore(blob)
    assert restored == state
    assert restored.snapshot() == blob


def test_a_capture_is_not_changed_by_later_applies() -> None:
    state = with_releases(10)
    before = reference_snapshot(state)
    serialise = state.snapshot_capture()
    pending = [r.id for r in state.releases.values() if r.status == "requested"]
    assert pending
    # Applied after the capture: an outcome, a new release, a rotation, a new member.
    run(
        state,
        encode_command(
            "release.outcome",
            release=pending[0],
            node="km2",
            status="provisioned",
            service_measurement=SERVICE_OK,
        ),
        encode_command("release.request", key="db", node="km1"),
        encode_command("key.rotate", key="db"),
        encode_command("member.add", member=member("km3", 7103)),
    )
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(serialise()))
    thread.start()
    thread.join(10)
    assert result == [before]
    assert state.snapshot() != before


def test_releases_are_immutable_so_captures_can_share_them() -> None:
    state = with_releases(3)
    release = next(iter(state.releases.values()))
    assert isinstance(release, Release)
    with pytest.raises(dataclasses.FrozenInstanceError):
        release.status = "provisioned"  # type: ignore[misc]
