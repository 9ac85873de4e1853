"""Governance in the state machine: a proposal passes when enough of today's admins voted for
it, applies all of its actions or none, and can be withdrawn (by its proposer) or rejected.
Each case asserts what changed, and that nothing else did."""

from __future__ import annotations

from typing import Any

from kmnode.identity import IdentityKeys, PublicIdentity
from kmnode.km.commands import ProposalChanged
from kmnode.km.state import KMState, encode_command
from tests.km.test_state import member, run
from tests.km.test_state_auth import T0, genesis, refusal

ANN, BEN, CAT = (IdentityKeys.generate(n).public(["admin"]) for n in ("ann", "ben", "cat"))
OPS = IdentityKeys.generate("ops").public(["operator"])
M = "cd" * 32
ALLOW = {"op": "policy.allow", "role": "service", "measurement": M}
_ids = iter(range(10**6))


def stamp(who: PublicIdentity) -> dict[str, Any]:
    return {"by": who.name, "request": f"{who.name}:{next(_ids)}", "created": T0}


def cluster(*admins: PublicIdentity, threshold: int = 0) -> KMState:
    state = genesis((*admins, OPS), admitted=[member("km1", 7101), member("km2", 7102)])
    if threshold:
        (made,) = run(state, propose(admins[0], {"op": "constitution.set", "threshold": threshold}))
        for admin in admins[1:threshold]:
            run(state, vote(admin, made.proposal))
        assert state.threshold == threshold
    return state


def propose(who: PublicIdentity, *actions: dict[str, Any]) -> bytes:
    return encode_command("proposal.create", actions=list(actions), auth=stamp(who))


def vote(who: PublicIdentity, proposal: str, ballot: str = "for") -> bytes:
    return encode_command("proposal.vote", proposal=proposal, ballot=ballot, auth=stamp(who))


def allowed(state: KMState) -> bool:
    return bytes.fromhex(M) in state.policy.service_measurements


def test_one_admin_passes_its_own_proposal_at_once() -> None:
    state = cluster(ANN)
    (made,) = run(state, propose(ANN, ALLOW))
    assert isinstance(made, ProposalChanged)
    assert (made.state, made.votes_for, made.needed) == ("accepted", ["ann"], 1)
    assert allowed(state)


def test_two_of_three_need_the_second_vote() -> None:
    state = cluster(ANN, BEN, CAT, threshold=2)
    (made,) = run(state, propose(ANN, ALLOW))
    assert (made.state, made.needed) == ("open", 2) and not allowed(state)
    (again,) = run(state, vote(ANN, made.proposal))  # voting twice is still one vote
    assert again.state == "open" and not allowed(state)
    (by_operator,) = run(state, vote(OPS, made.proposal))
    assert refusal(by_operator)[0] == "forbidden" and not allowed(state)
    (passed,) = run(state, vote(BEN, made.proposal))
    assert (passed.state, passed.votes_for) == ("accepted", ["ann", "ben"]) and allowed(state)
    (late,) = run(state, vote(CAT, made.proposal))
    assert refusal(late) == ("refused", f"proposal {made.proposal} is accepted")


def test_a_majority_by_default_and_rejection_once_it_cannot_pass() -> None:
    state = cluster(ANN, BEN, CAT)
    assert state.votes_needed() == 2
    (made,) = run(state, propose(ANN, ALLOW))
    run(state, vote(BEN, made.proposal, "against"))
    (rejected,) = run(state, vote(CAT, made.proposal, "against"))
    assert rejected.state == "rejected" and not allowed(state)


def test_a_withdrawn_proposal_cannot_pass_and_only_its_proposer_withdraws() -> None:
    state = cluster(ANN, BEN, CAT)
    (made,) = run(state, propose(ANN, ALLOW))
    withdraw = encode_command("proposal.withdraw", proposal=made.proposal, auth=stamp(BEN))
    assert refusal(run(state, withdraw)[0])[0] == "forbidden"
    withdraw = encode_command("proposal.withdraw", proposal=made.proposal, auth=stamp(ANN))
    assert run(state, withdraw)[0].state == "withdrawn"
    (too_late,) = run(state, vote(BEN, made.proposal))
    assert refusal(too_late)[0] == "refused" and not allowed(state)


def test_actions_apply_all_or_none() -> None:
    state = cluster(ANN)
    before = (state.policy, dict(state.identities), dict(state.members))
    (made,) = run(
        state,
        propose(ANN, ALLOW, {"op": "identity.remove", "name": "nobody"}),
    )
    assert made.state == "failed" and "nobody" in made.error
    assert (state.policy, state.identities, state.members) == before


def test_the_last_admin_cannot_be_removed_nor_a_threshold_set_out_of_reach() -> None:
    state = cluster(ANN, BEN)
    (made,) = run(state, propose(ANN, {"op": "constitution.set", "threshold": 3}))
    (passed,) = run(state, vote(BEN, made.proposal))
    assert passed.state == "failed" and "could never be cast" in passed.error
    assert state.threshold == 0
    (made,) = run(
        state,
        propose(
            ANN, {"op": "identity.remove", "name": "ann"}, {"op": "identity.remove", "name": "ben"}
        ),
    )
    (passed,) = run(state, vote(BEN, made.proposal))
    assert passed.state == "failed" and "nobody could govern" in passed.error
    assert set(state.admins()) == {"ann", "ben"}


def test_identities_chaos_and_members_change_by_proposal() -> None:
    state = cluster(ANN)
    run(state, encode_command("member.add", member=member("km2", 7102)))
    dan = IdentityKeys.generate("dan").public(["admin", "auditor"])
    (made,) = run(
        state,
        propose(
            ANN,
            {"op": "identity.set", "identity": dan.model_dump(mode="json")},
            {"op": "chaos.set", "enabled": True},
            {"op": "member.remove", "name": "km2"},
        ),
    )
    assert made.state == "accepted"
    assert state.identities["dan"] == dan and state.chaos_enabled and "km2" not in state.members
    assert state.votes_needed() == 2  # two admins now: the next proposal needs both


def test_an_operator_cannot_propose_and_proposals_survive_a_snapshot() -> None:
    state = cluster(ANN, BEN)
    assert refusal(run(state, propose(OPS, ALLOW))[0])[0] == "forbidden"
    (made,) = run(state, propose(ANN, ALLOW))
    restored = KMState.restore(state.snapshot())
    assert restored.proposals == state.proposals
    (passed,) = run(restored, vote(BEN, made.proposal))
    assert passed.state == "accepted" and allowed(restored)


def test_only_an_admitted_node_joins_and_as_it_was_admitted() -> None:
    state = cluster(ANN, BEN)
    km3 = member("km3", 7103)
    (pending,) = run(state, encode_command("member.add", member=km3))
    assert refusal(pending) == ("refused", "'km3' is not admitted as that member")
    (made,) = run(state, propose(ANN, {"op": "node.admit", "member": km3}))
    assert made.state == "open" and "km3" not in state.admitted
    run(state, vote(BEN, made.proposal))
    assert state.admitted["km3"].model_dump() == km3
    (elsewhere,) = run(state, encode_command("member.add", member={**km3, "host": "10.6.6.6"}))
    assert refusal(elsewhere)[0] == "refused" and "km3" not in state.members
    (joined,) = run(state, encode_command("member.add", member=km3))
    assert joined.ok and state.members["km3"].host == "127.0.0.1"


def test_a_removed_member_needs_admitting_again_and_a_rejection_is_remembered() -> None:
    state = cluster(ANN)
    assert run(state, encode_command("member.add", member=member("km2", 7102)))[0].ok
    run(state, propose(ANN, {"op": "member.remove", "name": "km2"}))
    assert "km2" not in state.members and "km2" not in state.admitted
    (back,) = run(state, encode_command("member.add", member=member("km2", 7102)))
    assert refusal(back)[0] == "refused"
    two = cluster(ANN, BEN)
    (made,) = run(two, propose(ANN, {"op": "node.admit", "member": member("km9", 7109)}))
    (rejected,) = run(two, vote(BEN, made.proposal, "against"))
    assert rejected.state == "rejected" and two.denied == {"km9"}
