"""Building the typed metric families ``GET /metrics`` renders (``km_messages.MetricFamily``):
one set of constructors for the KM enclave's families (``kmnode.km.metrics``) and the host's
(``kmnode.host.observe``)."""

from __future__ import annotations

from collections.abc import Mapping

from kmnode.histogram import Histogram
from kmnode.km_messages import HistogramBucket, MetricFamily, MetricSample

#: A sample's labels, as a hashable key: ((name, value), ...).
Labels = tuple[tuple[str, str], ...]


def gauge(name: str, help_text: str, value: float, **labels: str) -> MetricFamily:
    return MetricFamily(
        name=name, kind="gauge", help=help_text, samples=[MetricSample(labels=labels, value=value)]
    )


def counter(name: str, help_text: str, samples: Mapping[Labels, float]) -> MetricFamily:
    return MetricFamily(
        name=name,
        kind="counter",
        help=help_text,
        samples=[MetricSample(labels=dict(k), value=v) for k, v in sorted(samples.items())],
    )


def counter_by(name: str, help_text: str, label: str, values: Mapping[str, float]) -> MetricFamily:
    """A counter with one label: ``values`` maps its value to the count."""
    return counter(name, help_text, {((label, k),): float(v) for k, v in values.items()})


def histogram(name: str, help_text: str, source: Histogram) -> MetricFamily:
    return MetricFamily(
        name=name,
        kind="histogram",
        help=help_text,
        buckets=[HistogramBucket(le=b, count=c) for b, c in source.cumulative()],
        sum=source.sum,
    )
