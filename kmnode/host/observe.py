"""What a node shows to monitoring, on its API port and without a signature (like
``/v1/status``, for probes and scrapers):

* ``GET /metrics``: the Prometheus text format. The KM enclave's families
  (``kmnode.km.metrics``: Raft, releases, attestation failures, peer links, contracts) are read
  over the circuit at scrape time, the host's own (MQTT, the service output ring, its fsyncs)
  from its counters; a collector renders them, so nothing is added to any hot path.
* ``GET /v1/health``: 200 when the node is ready (joined, a leader known, the secret held),
  503 with the reason otherwise: a readiness probe.
* ``GET /v1/health/live``: 200 while the host and its KM enclave process run: a liveness
  probe, which must not fail for a node that is merely waiting for a leader or for recovery
  shares (restarting it would not help).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kmnode.km_messages import (
    MetricFamily,
    MetricsReply,
    MetricsRequest,
    StatusReply,
    StatusRequest,
)
from kmnode.metric_families import counter_by, gauge, histogram

if TYPE_CHECKING:
    from kmnode.host.node import KMNode

#: The routes served here (open, read-only: any Host name may ask them).
MONITORING_PATHS = frozenset({"/metrics", "/v1/health", "/v1/health/live"})
#: How long a probe or a scrape waits for the KM enclave.
ANSWER_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot(Collector):
    """The families read for one scrape."""

    def __init__(self, families: Iterable[MetricFamily]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield _prometheus(family)


def _prometheus(family: MetricFamily) -> Metric:
    if family.kind == "histogram":
        out = HistogramMetricFamily(family.name, family.help)
        buckets = [(_le(b.le), float(b.count)) for b in family.buckets]
        out.add_metric([], buckets, family.sum)
        return out
    names = sorted({k for s in family.samples for k in s.labels})
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(family.name, family.help, labels=names)
    for sample in family.samples:
        metric.add_metric([sample.labels.get(n, "") for n in names], sample.value)
    return metric


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def host_families(node: KMNode) -> list[MetricFamily]:
    """The host's own counters."""
    stats = node.events.stats()
    families = [
        gauge("kmsim_node_info", "This node.", 1.0, node=node.name, cluster=node.config.cluster),
        counter_by(
            "kmsim_mqtt_messages",
            "MQTT messages published (acknowledged) and dropped (oldest, when the broker lags).",
            "outcome",
            {"published": stats.published, "dropped": stats.dropped},
        ),
        gauge("kmsim_mqtt_connected", "1 while connected to the broker.", float(stats.connected)),
        counter_by(
            "kmsim_service_outputs",
            "Records the host drained from the service enclave's ring.",
            "kind",
            {"drained": float(node.service_output.outputs)},
        ),
        counter_by(
            "kmsim_service_ring_replacements",
            "Fresh rings granted after the service enclave reported a ring error.",
            "kind",
            {"granted": float(node.service_output.replacements)},
        ),
    ]
    ring = node.service_output.ring
    if ring is not None:
        families += [
            gauge(
                "kmsim_service_ring_fill_bytes",
                "Unread bytes in the ring (shared header).",
                float(ring.used),
            ),
            gauge(
                "kmsim_service_ring_capacity_bytes",
                "The ring's data capacity.",
                float(ring.capacity),
            ),
            counter_by(
                "kmsim_service_ring_discarded",
                "Records the writer discarded (ring full).",
                "kind",
                {"discarded": float(ring.discarded)},
            ),
        ]
    disks = node.km.disks
    if disks is not None:
        families.append(
            histogram(
                "kmsim_host_fsync_seconds", "The host's fsyncs of the node's files.", disks.fsyncs
            )
        )
    families.append(
        counter_by(
            "kmsim_peer_connections_dropped_slow",
            "Peer connections the host dropped for not reading.",
            "kind",
            {"dropped": float(node.km.sockets.dropped_slow)},
        )
    )
    return families


class Observer:
    """The three routes, for one node's host."""

    def __init__(self, node: KMNode) -> None:
        self.node = node

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/health/live", self.live)

    async def _status(self) -> StatusReply | str:
        try:
            return await asyncio.wait_for(
                self.node.km.call(StatusRequest(), StatusReply), ANSWER_TIMEOUT_S
            )
        except Exception as exc:  # unreachable, stopped, timed out: not ready, say why
            return f"the KM enclave does not answer ({type(exc).__name__})"

    async def metrics(self, request: web.Request) -> web.Response:
        families = host_families(self.node)
        try:
            reply = await asyncio.wait_for(
                self.node.km.call(MetricsRequest(), MetricsReply), ANSWER_TIMEOUT_S
            )
            families += reply.families
            up = 1.0
        except Exception:  # the host's figures still count; the scrape says the enclave's not
            up = 0.0
        families.append(gauge("kmsim_km_enclave_up", "1 if the KM enclave answered.", up))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(families))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        status = await self._status()
        if isinstance(status, str):
            return _health(503, "not_ready", status)
        leader = status.raft.get("leader")
        if status.ready and leader:
            return _health(200, "ready", f"leader {leader}", leader=leader, node=status.node)
        if status.recovering:
            reason = "recovery mode: waiting for recovery shares (kmctl recovery submit)"
        elif not status.cluster:
            reason = "not joined a cluster yet"
        elif not leader:
            reason = "no leader known"
        else:
            reason = "not ready"
        return _health(503, "not_ready", reason, node=status.node)

    async def live(self, request: web.Request) -> web.Response:
        if self.node.km.running:
            return _health(200, "alive", "the host and its KM enclave run")
        return _health(503, "dead", "the KM enclave process is not running")


def _health(status: int, state: str, reason: str, **more: Any) -> web.Response:
    body: dict[str, Any] = {"status": state, "reason": reason, **more}
    if status != 200:  # the API's error shape too, for clients that read every error alike
        body |= {"error": reason, "code": "not_ready" if state == "not_ready" else "unavailable"}
    return web.json_response(body, status=status)
