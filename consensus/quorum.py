"""Majority arithmetic, kept in one place so every quorum decision uses the same rule.

A quorum is a strict majority of the voters: ``n // 2 + 1``. For an even-sized cluster that is
more than half (a 4-node cluster needs 3 votes), which is what makes two leaders in one term
impossible: two sets of 2 out of 4 do not have to intersect, two sets of 3 do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from consensus.types import NodeId


def quorum(voters: int) -> int:
    """Smallest number of voters that forms a majority (0 voters: no quorum is possible)."""
    return voters // 2 + 1


def committed_index(voters: Iterable[NodeId], match: Mapping[NodeId, int]) -> int:
    """Highest index stored on a majority of ``voters`` (0 if there are no voters).

    Sort the voters' match indexes in descending order; the quorum-th one is held by at least a
    quorum of voters. A voter missing from ``match`` counts as holding nothing.
    """
    indexes = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not indexes:
        return 0
    return indexes[quorum(len(indexes)) - 1]


class VoteResult:
    """Outcome of a (pre-)vote tally."""

    PENDING = 0
    WON = 1
    LOST = 2


def tally(voters: tuple[NodeId, ...], votes: Mapping[NodeId, bool]) -> int:
    """WON once a quorum granted, LOST once a quorum can no longer be reached, else PENDING.

    Only responses from current voters count: a learner or a removed node cannot elect anyone.
    """
    granted = rejected = 0
    for v in voters:
        got = votes.get(v)
        if got is True:
            granted += 1
        elif got is False:
            rejected += 1
    q = quorum(len(voters))
    if granted >= q:
        return VoteResult.WON
    if rejected > len(voters) - q:
        return VoteResult.LOST
    return VoteResult.PENDING
