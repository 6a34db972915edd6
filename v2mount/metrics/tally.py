"""Counters, gauges and histograms for the per-request metrics, at a fraction of the cost.

Every inference updates five metrics (REST count, latency and requests in progress;
inference count and latency). prometheus-client's children take a lock for every update
and its histogram walks its buckets in Python: ≈ 4 µs per request, more than a tenth of
what v2mount's whole REST path costs on a tiny model. These keep plain numbers instead,
updated on the event loop thread that serves the app (as ``InferenceStats`` is), and
``TallyCollector`` renders them at scrape time with the same names, labels, buckets and
samples (``_total``, ``_bucket``, ``_count``, ``_sum``, ``_created``) that
prometheus-client's own metrics would: ``/metrics`` reads the same.

They serve only the default, single-process mode: with ``PROMETHEUS_MULTIPROC_DIR`` the
values must live in prometheus-client's shared files, and ``AppMetrics`` uses its
metrics.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import INF, floatToGoString

__all__ = ["TallyCollector", "TallyCounter", "TallyGauge", "TallyHistogram"]


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramChild:
    """Counts per bucket (not cumulative) and the sum; ``bounds`` end with +Inf."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # prometheus-client's rule: the first bucket whose bound is >= amount.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", CounterChild, GaugeChild, HistogramChild)


class _Tally(Generic[Child]):
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        """The child for these label values (created on first use, as prometheus-client)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(value) for value in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self._child()
        return child

    def _child(self) -> Child:
        raise NotImplementedError

    def family(self, created: bool) -> Metric:
        """The metric family as prometheus-client would collect it."""
        metric = Metric(self.name, self.documentation, self.kind)
        for key, child in list(self.children.items()):
            self._samples(metric, dict(zip(self.labelnames, key, strict=True)), child, created)
        return metric

    def _samples(self, metric: Metric, labels: dict[str, str], child: Child, created: bool) -> None:
        raise NotImplementedError


class TallyCounter(_Tally[CounterChild]):
    kind = "counter"

    def _child(self) -> CounterChild:
        return CounterChild()

    def _samples(
        self, metric: Metric, labels: dict[str, str], child: CounterChild, created: bool
    ) -> None:
        metric.add_sample(self.name + "_total", labels, child.value)
        if created:
            metric.add_sample(self.name + "_created", labels, child.created)


class TallyGauge(_Tally[GaugeChild]):
    kind = "gauge"

    def _child(self) -> GaugeChild:
        return GaugeChild()

    def _samples(
        self, metric: Metric, labels: dict[str, str], child: GaugeChild, created: bool
    ) -> None:
        metric.add_sample(self.name, labels, child.value)


class TallyHistogram(_Tally[HistogramChild]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _samples(
        self, metric: Metric, labels: dict[str, str], child: HistogramChild, created: bool
    ) -> None:
        counts, total = list(child.counts), child.sum  # a copy: the buckets and the count agree
        cumulative = 0.0
        for le, count in zip(self._les, counts, strict=True):
            cumulative += count
            metric.add_sample(self.name + "_bucket", {**labels, "le": le}, cumulative)
        metric.add_sample(self.name + "_count", labels, cumulative)
        metric.add_sample(self.name + "_sum", labels, total)
        if created:
            metric.add_sample(self.name + "_created", labels, child.created)


def _created_series() -> bool:
    """Whether prometheus-client writes ``_created`` samples now
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``)."""
    probe = Counter("probe", "probe", registry=None)
    return any(
        sample.name.endswith("_created") for family in probe.collect() for sample in family.samples
    )


class TallyCollector:
    """Renders its tallies at each scrape; registered in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tallies: list[_Tally[CounterChild] | _Tally[GaugeChild] | _Tally[HistogramChild]] = []
        self._registry = registry

    def counter(self, name: str, documentation: str, labelnames: Sequence[str]) -> TallyCounter:
        tally = TallyCounter(name, documentation, labelnames)
        self.tallies.append(tally)
        return tally

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str]) -> TallyGauge:
        tally = TallyGauge(name, documentation, labelnames)
        self.tallies.append(tally)
        return tally

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str]) -> TallyHistogram:
        tally = TallyHistogram(name, documentation, labelnames)
        self.tallies.append(tally)
        return tally

    def register(self) -> None:
        """Register in the registry, once every tally is declared (names are checked
        against the other collectors' then)."""
        self._registry.register(self)

    def describe(self) -> list[Metric]:
        return [Metric(t.name, t.documentation, t.kind) for t in self.tallies]

    def collect(self) -> Iterable[Metric]:
        created = _created_series()
        return [tally.family(created) for tally in self.tallies]
