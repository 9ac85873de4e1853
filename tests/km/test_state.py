"""The replicated KM state machine: deterministic, refuses bad commands, records releases."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from attest.policy import Policy
from kmnode.km.commands import ClusterInitialised, KeyGeneration, Refused, ReleaseCompleted
from kmnode.km.state import KMState, encode_command

SERVICE_OK = "aa" * 32
SERVICE_BAD = "bb" * 32
POLICY = Policy(service_measurements=frozenset({bytes.fromhex(SERVICE_OK)}), min_svn=1).to_dict()


def member(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "platform_id": f"p-{name}",
        "host": "127.0.0.1",
        "peer_port": port,
        "api_port": port + 100,
    }


def run(state: KMState, *commands: bytes) -> list[dict[str, Any]]:
    return [state.apply(state.applied_index + 1, c) for c in commands]


def initialised() -> KMState:
    state = KMState()
    (result,) = run(
        state,
        encode_command("cluster.init", cluster="demo", policy=POLICY, member=member("km1", 7101)),
    )
    assert result == ClusterInitialised("demo")
    return state


def test_key_lifecycle_and_release_flow() -> None:
    state = initialised()
    results = run(
        state,
        encode_command("member.add", member=member("km2", 7102)),
        encode_command("key.create", name="db"),
        encode_command("key.rotate", key="db"),
        encode_command("release.request", key="db", node="km2"),
        encode_command("release.request", key="db", node="km1", generation=1),
    )
    assert [r.ok for r in results] == [True] * 5
    assert results[2] == KeyGeneration("db", 2)
    release_id = results[3].release
    assert state.releases[release_id].generation == 2
    assert state.releases[results[4].release].generation == 1
    outcome = run(
        state,
        encode_command(
            "release.outcome",
            release=release_id,
            node="km2",
            status="provisioned",
            service_measurement=SERVICE_OK,
        ),
    )
    assert outcome == [ReleaseCompleted(release_id, "provisioned")]
    assert outcome[0].public() == {"ok": True, "release": release_id, "status": "provisioned"}
    again = run(
        state, encode_command("release.outcome", release=release_id, node="km2", status="refused")
    )
    assert again[0] == Refused(f"release {release_id} is already provisioned")


def test_provisioning_to_a_disallowed_measurement_cannot_be_recorded() -> None:
    state = initialised()
    run(state, encode_command("key.create", name="db"))
    (req,) = run(state, encode_command("release.request", key="db", node="km1"))
    (bad,) = run(
        state,
        encode_command(
            "release.outcome",
            release=req.release,
            node="km1",
            status="provisioned",
            service_measurement=SERVICE_BAD,
        ),
    )
    assert isinstance(bad, Refused) and "not allowed" in bad.error
    (refused,) = run(
        state,
        encode_command(
            "release.outcome",
            release=req.release,
            node="km1",
            status="refused",
            reason="UnknownMeasurement",
            service_measurement=SERVICE_BAD,
        ),
    )
    assert refused.ok is True
    assert state.releases[req.release].status == "refused"


def test_per_key_allowed_measurements_override_policy() -> None:
    state = initialised()
    run(state, encode_command("key.create", name="narrow", allowed_service=[SERVICE_BAD]))
    assert state.service_allowed("narrow", SERVICE_BAD)
    assert not state.service_allowed("narrow", SERVICE_OK)
    run(state, encode_command("key.create", name="wide"))
    assert state.service_allowed("wide", SERVICE_OK)
    assert not state.service_allowed("wide", SERVICE_BAD)


def test_bad_commands_are_refused_specifically_and_change_nothing_but_the_chain() -> None:
    state = initialised()
    before = json.loads(state.snapshot())
    cases = {
        b"not json": "not JSON",
        b"[1,2]": "object with a string 'op'",
        encode_command("key.explode"): "unknown operation",
        encode_command("key.create", name="bad name!"): "'name': String should match pattern",
        encode_command("key.create", name="db", owner="me"): "'owner': Extra inputs",
        encode_command("release.request", key="db", node="km1", generation=True): "'generation'",
        encode_command("key.rotate", key="missing"): "no key named 'missing'",
        encode_command("release.request", key="missing", node="km1"): "no key",
        encode_command("member.add", member=member("km1", 7109)): "already a member",
        encode_command("member.remove", name="km1"): "last member",
        encode_command(
            "cluster.init", cluster="again", policy=POLICY, member=member("x", 1)
        ): "already initialised",
        encode_command("policy.allow", role="root", measurement=SERVICE_OK): "'role': Input should",
        b"x" * 70000: "exceeds",
    }
    for command, expected in cases.items():
        (result,) = run(state, command)
        assert isinstance(result, Refused) and expected in result.error, (command[:40], result)
    after = json.loads(state.snapshot())
    for changing in ("applied_index", "chain_hash"):
        before.pop(changing), after.pop(changing)
    assert after == before


def test_release_of_unknown_generation_and_non_member_refused() -> None:
    state = initialised()
    run(state, encode_command("key.create", name="db"))
    (r1,) = run(state, encode_command("release.request", key="db", node="km1", generation=2))
    (r2,) = run(state, encode_command("release.request", key="db", node="km7"))
    assert isinstance(r1, Refused) and isinstance(r2, Refused)
    assert "generations 1..1" in r1.error and "not a member" in r2.error


def test_commands_before_init_are_refused() -> None:
    state = KMState()
    (result,) = run(state, encode_command("key.create", name="db"))
    assert result == Refused("the cluster is not initialised yet")


def test_revoked_platform_cannot_join() -> None:
    state = initialised()
    run(state, encode_command("policy.revoke_platform", platform_id="p-km2"))
    (result,) = run(state, encode_command("member.add", member=member("km2", 7102)))
    assert isinstance(result, Refused) and "revoked" in result.error


COMMANDS = st.one_of(
    st.builds(lambda n: encode_command("key.create", name=n), st.sampled_from(["a", "b", "c"])),
    st.builds(lambda n: encode_command("key.rotate", key=n), st.sampled_from(["a", "b", "z"])),
    st.builds(
        lambda n, node: encode_command("release.request", key=n, node=node),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["km1", "km2"]),
    ),
    st.builds(
        lambda i, s: encode_command(
            "release.outcome", release=f"r{i}", node="km1", status=s, service_measurement=SERVICE_OK
        ),
        st.integers(1, 30),
        st.sampled_from(["provisioned", "refused"]),
    ),
    st.builds(
        lambda m: encode_command("member.add", member=member(m, 7200)),
        st.sampled_from(["km2", "km3"]),
    ),
    st.binary(max_size=20),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(COMMANDS, max_size=30), st.integers(0, 30))
def test_replicas_and_snapshots_agree(commands: list[bytes], cut: int) -> None:
    """Two replicas applying the same log agree; a replica restored from a snapshot mid-way
    and then applying the rest agrees too (what a lagging follower does)."""
    a, b = initialised(), initialised()
    results_a = run(a, *commands)
    results_b = run(b, *commands)
    assert results_a == results_b and a.snapshot() == b.snapshot()

    c = initialised()
    cut = min(cut, len(commands))
    run(c, *commands[:cut])
    restored = KMState.restore(c.snapshot())
    assert restored.snapshot() == c.snapshot()
    run(restored, *commands[cut:])
    assert restored.snapshot() == a.snapshot()
