"""The chaos checker's governance invariant, on ledgers made to break it: a change without a
proposal, a proposal passed short of votes, a join without admission, a release without an
operator. A faulty state machine (``Lenient``) lets them through; the checker must not."""

from __future__ import annotations

from typing import Any

import pytest

from consensus.types import Entry, EntryType
from kmnode.chaos.governance import check_governance
from kmnode.km import state as state_module
from kmnode.km.commands import MemberAdd, MemberChanged
from kmnode.km.state import KMState, encode_command
from tests.km.test_state import POLICY, member
from tests.km.test_state_proposals import ANN, BEN, OPS, propose, stamp, vote

M = "cd" * 32


class Lenient(KMState):
    """A state machine with its checks switched off (what the checker must not rely on)."""

    def _check_auth(self, command: Any) -> None:
        return None

    def votes_needed(self) -> int:
        return 1


def _join_unasked(state: KMState, index: int, cmd: MemberAdd) -> Any:
    """A member.add that asks for no admission."""
    state._add_member(index, cmd.member)
    return MemberChanged(cmd.member.name)


def entries(*commands: bytes) -> list[Entry]:
    return [
        Entry(index=i, term=1, type=EntryType.NORMAL, data=c) for i, c in enumerate(commands, 1)
    ]


def genesis(*admins: Any) -> bytes:
    return encode_command(
        "cluster.init",
        cluster="demo",
        policy=POLICY,
        member=member("km1", 7101),
        identities=[i.model_dump(mode="json") for i in (*admins, OPS)],
        admitted=[member("km1", 7101)],
    )


def test_an_honest_ledger_passes() -> None:
    log = entries(
        genesis(ANN, BEN),
        propose(ANN, {"op": "policy.allow", "role": "service", "measurement": M}),
        vote(BEN, "p2"),
        propose(ANN, {"op": "node.admit", "member": member("km2", 7102)}),
        vote(BEN, "p4"),
        encode_command("member.add", member=member("km2", 7102)),
        encode_command("key.create", name="db", auth=stamp(OPS)),
        encode_command("release.request", key="db", node="km2", auth=stamp(OPS)),
    )
    outcome = check_governance(log, "km1")
    assert outcome.valid, outcome.detail
    assert outcome.detail.startswith("2 accepted proposal(s) had their votes, 1 join(s)")


def test_what_a_faulty_state_machine_let_through_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    log = entries(
        genesis(ANN, BEN),
        encode_command("policy.allow", role="service", measurement=M, auth=stamp(ANN)),
        propose(ANN, {"op": "chaos.set", "enabled": True}),  # one vote of two
        encode_command("member.add", member=member("km9", 7109)),
        encode_command("key.create", name="db", auth=stamp(OPS)),
        encode_command("release.request", key="db", node="km1", auth=stamp(ANN)),
    )
    assert check_governance(log, "km1").valid  # the honest state machine refuses them all
    monkeypatch.setitem(state_module._HANDLERS, MemberAdd, _join_unasked)
    outcome = check_governance(log, "km1", state=Lenient())
    assert not outcome.valid and outcome.violations == 4
    assert outcome.first_violation is not None
    assert "policy.allow took effect without a proposal" in outcome.first_violation.message


def test_a_ledger_from_before_identities_is_not_judged() -> None:
    log = entries(
        encode_command("cluster.init", cluster="demo", policy=POLICY, member=member("km1", 7101)),
        encode_command("policy.allow", role="service", measurement=M),
    )
    assert check_governance(log, "km1").valid
