"""The governance invariant, judged from a node's committed ledger after a chaos run: every
governance change took effect through a proposal that enough of that moment's admins voted for,
every node that joined was admitted first, and every release came from a signed request of an
identity that held the operator role.

The ledger is replayed through the state machine (``kmnode.km.state``) to know the identities,
admissions and proposals of each moment, but the verdicts are recounted here from the
committed commands themselves: a state machine that let a change through would not also be
trusted to say it was fine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from consensus.types import Entry
from kmnode.chaos.outcome import CheckOutcome, Violation
from kmnode.km.commands import ProposalChanged
from kmnode.km.state import KMState
from kmnode.ledger import committed_commands, read_ledger

#: Commands that change governed state; in a cluster with identities they only ever take
#: effect as a proposal's actions, never on their own.
GOVERNED_OPS = frozenset(
    {
        "policy.set", "policy.allow", "policy.disallow", "policy.revoke_platform",
        "member.remove", "identity.set", "identity.remove", "constitution.set", "chaos.set",
        "node.admit",
    }
)  # fmt: skip


def check_governance(
    entries: Iterable[Entry], node: str, state: KMState | None = None
) -> CheckOutcome:
    """Judge the committed ``entries`` of ``node``'s ledger (see the module docstring);
    ``state`` replays them (a fresh ``KMState`` unless a test hands in a faulty one)."""
    state = state if state is not None else KMState()
    violations: list[Violation] = []
    checked = {"proposals": 0, "releases": 0, "joins": 0}
    for entry in entries:
        try:
            command = json.loads(entry.data)
        except ValueError:
            command = None
        op = command.get("op") if isinstance(command, dict) else None
        # What judged this entry: the state before it applied.
        governed = bool(state.identities)
        before_admitted = dict(state.admitted)
        identities = dict(state.identities)
        threshold = state.threshold
        result = state.apply(entry.index, entry.data)
        if not result.ok or not governed or not isinstance(command, dict):
            continue
        where = f"entry {entry.index} on {node}"
        if op in GOVERNED_OPS:
            violations.append(
                Violation(f"{where}: {op} took effect without a proposal", None, node)
            )
        elif op == "member.add":
            checked["joins"] += 1
            name = command.get("member", {}).get("name")
            admitted = before_admitted.get(name)
            if admitted is None or admitted.model_dump() != command.get("member"):
                violations.append(Violation(f"{where}: {name!r} joined unadmitted", None, node))
        elif op == "release.request":
            checked["releases"] += 1
            by = (command.get("auth") or {}).get("by")
            if by not in identities or not identities[by].may("operator"):
                violations.append(
                    Violation(f"{where}: a release asked by {by!r}, no operator", None, node)
                )
        elif isinstance(result, ProposalChanged) and result.state == "accepted":
            checked["proposals"] += 1
            proposal = state.proposals[result.proposal]
            admins = {n for n, i in identities.items() if "admin" in i.roles}
            votes = {n for n, b in proposal.ballots.items() if b == "for" and n in admins}
            needed = threshold or len(admins) // 2 + 1
            if len(votes) < needed:
                message = f"{where}: {proposal.id} passed with {len(votes)} of {needed} votes"
                violations.append(Violation(message, None, node))
    passed = (
        f"{checked['proposals']} accepted proposal(s) had their votes, {checked['joins']} "
        f"join(s) were admitted, {checked['releases']} release(s) were an operator's ({node})"
    )
    return CheckOutcome.judge(violations, passed)


def check_ledger(raft_dir: Path, node: str) -> CheckOutcome:
    """``check_governance`` on a copy of a (running or stopped) node's Raft directory."""
    try:
        persisted = read_ledger(raft_dir)
    except Exception as exc:  # a ledger that cannot be read cannot vouch for anything
        return CheckOutcome(False, f"the ledger of {node} could not be read: {exc}")
    return check_governance(committed_commands(persisted), node)
