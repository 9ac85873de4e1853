"""Who may ask, checked where it counts: the state machine applies an operator's command only
for an identity that holds the role at that moment, and each request id once.

The leader's enclave checks the same before it proposes; these tests hold the state machine to
it on its own, as a faulty or hostile leader could commit anything."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kmnode.identity import IdentityKeys, PublicIdentity
from kmnode.km.commands import KeyGeneration, Refused
from kmnode.km.state import REQUEST_RETAIN_S, KMState, encode_command
from tests.km.test_state import POLICY, member, run

ADMIN = IdentityKeys.generate("ann").public(["admin"])
OPERATOR = IdentityKeys.generate("otto").public(["operator"])
AUDITOR = IdentityKeys.generate("aud").public(["auditor"])
T0 = 1_800_000_000


def auth(who: PublicIdentity, request: str, created: int = T0) -> dict[str, Any]:
    return {"by": who.name, "request": f"{who.name}:{request}", "created": created}


def genesis(identities: Iterable[PublicIdentity], **more: Any) -> KMState:
    """A state initialised with ``identities`` (and any other ``cluster.init`` fields)."""
    state = KMState()
    (result,) = run(
        state,
        encode_command(
            "cluster.init",
            cluster="demo",
            policy=POLICY,
            member=member("km1", 7101),
            identities=[i.model_dump(mode="json") for i in identities],
            **more,
        ),
    )
    assert result.ok, result
    return state


def governed() -> KMState:
    return genesis((ADMIN, OPERATOR, AUDITOR))


def refusal(result: Any) -> tuple[str, str]:
    assert isinstance(result, Refused), result
    return result.code, result.error


def test_genesis_identities_are_state() -> None:
    state = governed()
    assert state.identities == {i.name: i for i in (ADMIN, OPERATOR, AUDITOR)}


def test_an_operator_command_needs_a_signed_request_of_a_known_identity_with_the_role() -> None:
    state = governed()
    unsigned, unknown, auditor, admin_key = run(
        state,
        encode_command("key.create", name="db"),
        encode_command(
            "key.create", name="db", auth={"by": "mallory", "request": "mallory:1", "created": T0}
        ),
        encode_command("key.create", name="db", auth=auth(AUDITOR, "1")),
        encode_command("key.create", name="db", auth=auth(ADMIN, "1")),  # admin is not operator
    )
    assert refusal(unsigned)[0] == "forbidden"
    assert refusal(unknown)[0] == "unknown_identity"
    assert refusal(auditor) == (
        "forbidden",
        "'aud' (auditor) may not key.create: it needs the operator role",
    )
    assert refusal(admin_key)[0] == "forbidden"
    assert state.keys == {}
    (created,) = run(state, encode_command("key.create", name="db", auth=auth(OPERATOR, "1")))
    assert created == KeyGeneration("db", 1)


def test_governance_changes_apply_only_as_proposals() -> None:
    """Even an admin's signed request cannot change the policy directly: only a passed
    proposal does (tests/km/test_state_proposals.py)."""
    state = governed()
    measurement = "cc" * 32
    for who in (OPERATOR, ADMIN):
        (result,) = run(
            state,
            encode_command(
                "policy.allow", role="service", measurement=measurement, auth=auth(who, "p")
            ),
        )
        assert refusal(result) == (
            "forbidden",
            "policy.allow takes effect only as a passed proposal",
        )
    assert bytes.fromhex(measurement) not in state.policy.service_measurements
    (removed,) = run(state, encode_command("member.remove", name="km1", auth=auth(ADMIN, "m")))
    assert refusal(removed)[0] == "forbidden" and "km1" in state.members


def test_a_request_id_commits_once_even_when_its_command_was_refused() -> None:
    state = governed()
    first, replay = run(
        state,
        encode_command("key.create", name="db", auth=auth(OPERATOR, "n1")),
        encode_command("key.create", name="db2", auth=auth(OPERATOR, "n1")),
    )
    assert first.ok and refusal(replay)[0] == "replay"
    assert set(state.keys) == {"db"}
    # Refused for the state it met (no such key), then replayed once the key exists: still no.
    refused, _, replayed = run(
        state,
        encode_command("key.rotate", key="later", auth=auth(OPERATOR, "n2")),
        encode_command("key.create", name="later", auth=auth(OPERATOR, "n3")),
        encode_command("key.rotate", key="later", auth=auth(OPERATOR, "n2")),
    )
    assert refusal(refused)[0] == "refused" and refusal(replayed)[0] == "replay"
    assert state.keys["later"].generation == 1


def test_ids_are_forgotten_after_the_window_and_older_requests_refused() -> None:
    state = governed()
    run(state, encode_command("key.create", name="a", auth=auth(OPERATOR, "old", T0)))
    later = T0 + REQUEST_RETAIN_S + 1
    (fresh,) = run(state, encode_command("key.create", name="b", auth=auth(OPERATOR, "new", later)))
    assert fresh.ok
    assert "otto:old" not in state.requests and "otto:new" in state.requests
    (replayed,) = run(state, encode_command("key.create", name="c", auth=auth(OPERATOR, "old", T0)))
    assert refusal(replayed)[0] == "replay"  # too old to be told apart from a replay
    assert "c" not in state.keys


def test_the_window_keeps_the_state_bounded() -> None:
    state = governed()
    for i in range(50):
        created = T0 + i * REQUEST_RETAIN_S // 10
        (result,) = run(
            state, encode_command("key.create", name=f"k{i}", auth=auth(OPERATOR, f"{i}", created))
        )
        assert result.ok
    assert len(state.requests) <= 11


def test_snapshots_keep_identities_and_spent_ids() -> None:
    state = governed()
    run(state, encode_command("key.create", name="db", auth=auth(OPERATOR, "n1")))
    restored = KMState.restore(state.snapshot())
    assert restored.identities == state.identities
    assert restored.requests == state.requests and restored.newest_request == T0
    (replay,) = run(restored, encode_command("key.create", name="x", auth=auth(OPERATOR, "n1")))
    assert refusal(replay)[0] == "replay"


def test_a_cluster_from_before_identities_applies_as_it_did() -> None:
    state = KMState()
    run(
        state,
        encode_command("cluster.init", cluster="demo", policy=POLICY, member=member("km1", 7101)),
    )
    (created,) = run(state, encode_command("key.create", name="db"))
    assert created.ok and state.identities == {}
