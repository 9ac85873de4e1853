"""The audit trail a running node can export (`kmctl audit export`), read from the replicated
state: every release (its request, then its outcome) and every proposal (made, then closed),
each at the ledger index where it happened, in index order. The same on every node that has
applied as far; nothing secret (key names, generations, nodes, reasons, who proposed what).
"""

from __future__ import annotations

from typing import Any

from kmnode.km.state import KMState


def audit_records(state: KMState, since: int, limit: int) -> dict[str, Any]:
    """Records at ledger indexes above ``since``, at most ``limit`` of them, and the index to
    ask from next (``next``: None when there is no more)."""
    records: list[dict[str, Any]] = []
    for release in state.releases.values():
        base = {
            "release": release.id,
            "key": release.key,
            "generation": release.generation,
            "node": release.node,
        }
        records.append({"index": release.requested_index, "kind": "release.requested", **base})
        if release.completed_index:
            records.append(
                {
                    "index": release.completed_index,
                    "kind": f"release.{release.status}",
                    **base,
                    "reason": release.reason,
                    "service_measurement": release.service_measurement,
                }
            )
    for proposal in state.proposals.values():
        base = {"proposal": proposal.id, "proposer": proposal.proposer}
        created = {"index": proposal.created_index, "kind": "proposal.created", **base}
        records.append({**created, "actions": proposal.actions})
        if proposal.closed_index:
            closed = {"index": proposal.closed_index, "kind": f"proposal.{proposal.state}"}
            records.append(
                {**closed, **base, "ballots": dict(proposal.ballots), "error": proposal.error}
            )
    later = sorted(
        (r for r in records if r["index"] > since), key=lambda r: (r["index"], r["kind"])
    )
    if len(later) <= limit:
        return {"applied": state.applied_index, "records": later, "next": None}
    # One entry can make several records (a release to every node): a page ends between two
    # indexes, so asking again from ``next`` loses none (a single index larger than a page is
    # returned whole).
    cut = limit
    while cut > 0 and later[cut]["index"] == later[cut - 1]["index"]:
        cut -= 1
    if cut == 0:
        first = later[0]["index"]
        cut = sum(1 for r in later if r["index"] == first)
    page = later[:cut]
    return {"applied": state.applied_index, "records": page, "next": page[-1]["index"]}
