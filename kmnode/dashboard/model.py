"""The dashboard's aggregation: what each node answered, in; one view of the cluster, out.

Pure functions over typed samples, so rates, the link graph and down nodes are tested without
a network. A node's answers come from its untrusted host: ``/v1/status`` is validated into
:class:`NodeStatus` (an answer of another shape shows the node as ``error``, never half-read),
and only finite, non-negative samples of ``/metrics`` are taken.

Rates are deltas of counters between two polls over the time between them, as Prometheus's
``rate()`` does; a counter that went down (the node restarted) counts from zero again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from kmnode.supervisor import describe_readiness

#: At most this many peers are read from one status answer (a cluster is far smaller).
MAX_PEERS = 256
Name = Annotated[str, Field(max_length=64)]
NodeState = Literal["ready", "not ready", "recovering", "down", "error"]
#: ``up``: both ends attested each other; ``one-way``: only one end did; ``down``: neither, or
#: an end is not answering.
LinkState = Literal["up", "one-way", "down"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _Peer(_Strict):
    attested: bool = False


class _Service(_Strict):
    running: bool = False


class NodeStatus(_Strict):
    """The fields of ``GET /v1/status`` the page shows (kmnode.host.api)."""

    node: Name | None = None
    ready: bool = False
    recovering: bool = False
    role: Name | None = None
    leader: Name | None = None
    term: NonNegativeInt = 0
    commit: NonNegativeInt = 0
    applied: NonNegativeInt = 0
    peers: dict[Name, _Peer] = Field(default_factory=dict, max_length=MAX_PEERS)
    service: _Service = _Service()

    @property
    def attested(self) -> list[str]:
        return sorted(name for name, peer in self.peers.items() if peer.attested)


@dataclass(frozen=True)
class Figures:
    """The counters and gauges of one ``/metrics`` scrape that the page turns into rates."""

    #: Releases in the replicated state, every outcome (each node counts the whole cluster's).
    releases: float = 0.0
    #: Peer connections this node refused (handshake, attestation, protocol).
    attestation_failures: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0
    ring_fill_bytes: float | None = None
    ring_capacity_bytes: float | None = None


_SUMMED = {
    "kmsim_releases_total": "releases",
    "kmsim_attestation_failures_total": "attestation_failures",
    "kmsim_release_latency_seconds_sum": "latency_sum",
    "kmsim_release_latency_seconds_count": "latency_count",
    "kmsim_service_ring_fill_bytes": "ring_fill_bytes",
    "kmsim_service_ring_capacity_bytes": "ring_capacity_bytes",
}


def parse_metrics(text: str) -> Figures:
    """The figures of a Prometheus text scrape (labels summed away); raises ValueError if the
    text is not the Prometheus format. Samples that are not finite and non-negative are
    ignored: no counter of ours can be, so such a sample is a host's lie."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _SUMMED.get(sample.name)
            if key is not None and math.isfinite(sample.value) and sample.value >= 0:
                found[key] = found.get(key, 0.0) + sample.value
    return Figures(**found)


@dataclass(frozen=True)
class NodeSample:
    """What one node answered in one poll. ``status`` None: ``error`` says why, and ``down``
    whether the node did not answer at all (not reachable, no answer in time)."""

    name: str
    #: When the poll asked (a monotonic clock, seconds).
    at: float
    status: NodeStatus | None = None
    figures: Figures | None = None
    error: str | None = None
    down: bool = False


@dataclass(frozen=True)
class NodeView:
    name: str
    state: NodeState
    #: The readiness phase, or why the node is down or in error.
    detail: str
    role: str | None = None
    leader: str | None = None
    term: int | None = None
    commit: int | None = None
    applied: int | None = None
    #: Peers this node has an attested link with.
    peers: list[str] = field(default_factory=list)
    service_up: bool | None = None
    #: Per second, over the last poll (None: not known yet, or the node did not answer).
    release_rate: float | None = None
    attestation_failure_rate: float | None = None
    #: Mean latency of the releases applied since the last poll, in milliseconds.
    release_latency_ms: float | None = None
    #: The service enclave's output ring: unread bytes over its capacity, 0..1.
    ring_fill: float | None = None

    @property
    def status_known(self) -> bool:
        """Whether the node answered its status this poll."""
        return self.state not in ("down", "error")


@dataclass(frozen=True)
class LinkView:
    a: str
    b: str
    state: LinkState


@dataclass(frozen=True)
class ClusterView:
    cluster: str
    #: The node that leads in the highest term any answering node reports.
    leader: str | None
    term: int | None
    nodes: list[NodeView]
    links: list[LinkView]
    #: Releases per second: the leader's count (every node counts every release), else the
    #: highest any node shows.
    release_rate: float | None
    #: Refused peer connections per second, summed over the nodes.
    attestation_failure_rate: float | None


def rate(before: float | None, now: float | None, seconds: float) -> float | None:
    """A counter's increase per second; a counter that went down restarted from zero."""
    if before is None or now is None or seconds <= 0:
        return None
    increase = now - before if now >= before else now
    return increase / seconds


def node_view(now: NodeSample, before: NodeSample | None) -> NodeView:
    status = now.status
    if status is None:
        state: NodeState = "down" if now.down else "error"
        return NodeView(now.name, state, now.error or "no answer")
    ready, phase = describe_readiness(status.model_dump())
    state = "recovering" if status.recovering else "ready" if ready else "not ready"
    view = NodeView(
        name=now.name,
        state=state,
        detail=phase,
        role=status.role,
        leader=status.leader,
        term=status.term,
        commit=status.commit,
        applied=status.applied,
        peers=status.attested,
        service_up=status.service.running,
    )
    return _with_figures(view, now, before)


def _with_figures(view: NodeView, now: NodeSample, before: NodeSample | None) -> NodeView:
    figures = now.figures
    if figures is None:
        return view
    if figures.ring_capacity_bytes and figures.ring_fill_bytes is not None:
        view = replace(
            view, ring_fill=min(1.0, figures.ring_fill_bytes / figures.ring_capacity_bytes)
        )
    if before is None or before.status is None or before.figures is None:
        return view  # rates need two answers in a row
    previous, seconds = before.figures, now.at - before.at
    latency = None
    count = figures.latency_count - previous.latency_count
    if count > 0 and figures.latency_sum >= previous.latency_sum:
        latency = (figures.latency_sum - previous.latency_sum) / count * 1000
    return replace(
        view,
        release_rate=rate(previous.releases, figures.releases, seconds),
        attestation_failure_rate=rate(
            previous.attestation_failures, figures.attestation_failures, seconds
        ),
        release_latency_ms=latency,
    )


def links(nodes: Sequence[NodeView]) -> list[LinkView]:
    """One link per pair of nodes, its state from what each end reports."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            answering = a.status_known and b.status_known
            a_sees, b_sees = b.name in a.peers, a.name in b.peers
            state: LinkState = "down"
            if answering and a_sees and b_sees:
                state = "up"
            elif answering and (a_sees or b_sees):
                state = "one-way"
            out.append(LinkView(a.name, b.name, state))
    return out


def aggregate(
    cluster: str,
    names: Sequence[str],
    now: Mapping[str, NodeSample],
    before: Mapping[str, NodeSample],
) -> ClusterView:
    """The view of the cluster from this poll's samples and the previous poll's."""
    missing = NodeSample("", 0.0, error="not polled", down=True)
    nodes = [
        node_view(now.get(name) or replace(missing, name=name), before.get(name)) for name in names
    ]
    answering = [n for n in nodes if n.status_known]
    leaders = [n for n in answering if n.role == "leader"]
    leader = max(leaders, key=lambda n: n.term or 0) if leaders else None
    terms = [n.term for n in answering if n.term is not None]
    release_rate = leader.release_rate if leader is not None else None
    if release_rate is None:
        known = [n.release_rate for n in nodes if n.release_rate is not None]
        release_rate = max(known, default=None)
    failures = [n.attestation_failure_rate for n in nodes if n.attestation_failure_rate is not None]
    return ClusterView(
        cluster=cluster,
        leader=leader.name if leader is not None else None,
        term=max(terms, default=None),
        nodes=nodes,
        links=links(nodes),
        release_rate=release_rate,
        attestation_failure_rate=sum(failures) if failures else None,
    )
