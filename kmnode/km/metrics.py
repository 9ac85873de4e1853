"""What the KM enclave reports to ``GET /metrics``, read when Prometheus scrapes.

Nothing here runs on a hot path: the counters already exist (the Raft driver's, the peer
transport's, the release latency histogram, the replicated state's records), and this module
only reads them into typed families (``MetricFamily``) that the host renders in the Prometheus
text format. Labels are few and bounded: an outcome, a reason's kind (the text before its first
colon), a peer link counter's name. Nothing secret is in any of them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

from kmnode.km_messages import MetricFamily
from kmnode.metric_families import Labels, counter, gauge, histogram

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

#: A refusal reason's kind: the text before its first colon, at most this long.
REASON_KIND_CHARS = 60


def reason_kind(reason: str) -> str:
    """The bounded label for a free-text reason ("" -> "none")."""
    if not reason:
        return "none"
    return reason.split(":", 1)[0].strip()[:REASON_KIND_CHARS] or "other"


def collect(node: KMNode) -> list[MetricFamily]:
    """Every family the KM enclave reports, as of now."""
    state = node.enclave.state
    families: list[MetricFamily] = []
    driver = node.driver
    if driver is not None:
        status = driver.status
        stats = driver.stats
        families += [
            gauge("kmsim_raft_term", "Current Raft term.", status.term),
            gauge("kmsim_raft_commit_index", "Highest log index known committed.", status.commit),
            gauge(
                "kmsim_raft_applied_index", "Highest log index applied here.", driver.applied_index
            ),
            gauge(
                "kmsim_raft_is_leader", "1 if this node leads.", 1.0 if driver.is_leader else 0.0
            ),
            counter(
                "kmsim_raft_leader_changes",
                "Times this node saw the leader change.",
                {(): stats.leader_changes},
            ),
            counter(
                "kmsim_raft_proposals_failed",
                "Proposals that did not apply here (not leader, dropped, timed out).",
                {(): stats.proposals_failed},
            ),
            gauge(
                "kmsim_raft_fsync_avg_seconds",
                "Moving average of a synced log write (the Raft driver's view).",
                driver.fsync_avg_s,
            ),
        ]
    families.append(
        gauge(
            "kmsim_ready",
            "1 if the node is ready (joined, leader known, secret held).",
            1.0 if node.ready else 0.0,
        )
    )
    families.append(
        gauge(
            "kmsim_recovering",
            "1 while the node is in recovery mode.",
            1.0 if node.recovery.recovering else 0.0,
        )
    )
    outcomes: Counter[Labels] = Counter()
    for release in state.releases.values():
        outcomes[(("outcome", release.status), ("reason", reason_kind(release.reason)))] += 1
    families.append(
        counter(
            "kmsim_releases",
            "Releases in the replicated state by outcome and reason.",
            dict(outcomes),
        )
    )
    families.append(
        histogram(
            "kmsim_release_latency_seconds",
            "From a release's request applied here to its outcome applied here.",
            node.releases.latency,
        )
    )
    refusals: dict[Labels, float] = {(("reason", k),): float(n) for k, n in node.refusals.items()}
    families.append(
        counter(
            "kmsim_attestation_failures",
            "Peer connections refused (handshake, attestation, protocol) by kind.",
            refusals,
        )
    )
    early = node.early_attestations
    families.append(
        counter(
            "kmsim_early_attestations",
            "Service attestations started before their release committed, and used.",
            {(("state", "started"),): early.started, (("state", "used"),): early.used},
        )
    )
    links = dataclasses.asdict(node.transport.stats)
    families.append(
        counter(
            "kmsim_peer_link_events",
            "Peer link counters since start (messages, drops, handshakes, refusals).",
            {(("event", k),): float(v) for k, v in links.items() if isinstance(v, int)},
        )
    )
    families.append(
        gauge(
            "kmsim_peers_attested",
            "Peers with an attested link now.",
            len(node.transport.attested_peers()),
        )
    )
    contracts = node.contracts
    families += [
        gauge("kmsim_contract_position", "Contract operations executed here.", contracts.position),
        gauge("kmsim_contract_committed", "Contract operations committed.", state.contract_seq),
        gauge(
            "kmsim_contract_halted",
            "1 if contract execution halted here.",
            1.0 if contracts.halted else 0.0,
        ),
        gauge("kmsim_keys", "Keys in the replicated state.", len(state.keys)),
    ]
    return families
