"""``batch_request_queue`` and ``parallel_request_queue``: queue sizes read at scrape time.

The gauges are not updated on the hot path: at each scrape the collector asks every
model version for its runner's and batcher's frozen statistics, so an idle server costs
nothing and the numbers are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["QueueCollector", "QueueSource", "ScrapedCollector"]

_LABELS = ("model", "version")


class _RunnerQueue(Protocol):
    @property
    def queued(self) -> int: ...


class _BatcherQueue(Protocol):
    @property
    def queued_requests(self) -> int: ...


class QueueSource(Protocol):
    """One model version, as the collector sees it (``ModelHandle`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str | None: ...

    def runner_statistics(self) -> _RunnerQueue | None: ...

    def batcher_statistics(self) -> _BatcherQueue | None: ...


class ScrapedCollector(Collector):
    """Metric families read at scrape time from the model versions that ``track`` adds.

    Subclasses name their families in ``_families`` and fill them in ``collect``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._sources: list[Callable[[], Iterable[QueueSource]]] = []
        if registry is not None:
            registry.register(self)

    def track(self, sources: Callable[[], Iterable[QueueSource]]) -> None:
        self._sources.append(sources)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _models(self) -> Iterator[QueueSource]:
        for sources in self._sources:
            yield from list(sources())

    @staticmethod
    def _families() -> tuple[Metric, ...]:
        raise NotImplementedError


class QueueCollector(ScrapedCollector):
    """Gauges of requests waiting in each model's batcher and runner (or worker pool).

    ``batch_request_queue``: requests held in batches not yet dispatched (models with
    adaptive batching only). ``parallel_request_queue``: requests waiting for a free
    worker (every loaded model). ``collect`` runs in the scraping thread; the
    ``/metrics`` endpoint scrapes on the event loop, where the models' state lives.
    """

    def collect(self) -> Iterator[Metric]:
        batch, parallel = self._families()
        for source in self._models():
            labels = [source.name, source.version or ""]
            runner = source.runner_statistics()
            if runner is not None:
                parallel.add_metric(labels, runner.queued)
            batcher = source.batcher_statistics()
            if batcher is not None:
                batch.add_metric(labels, batcher.queued_requests)
        yield batch
        yield parallel

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "batch_request_queue",
                "Requests waiting in the adaptive batcher",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "parallel_request_queue",
                "Requests waiting for a free worker",
                labels=_LABELS,
            ),
        )
