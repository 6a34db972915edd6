"""The predictive batcher's counters and fitted cost, read from its statistics at scrape time.

Like the queue gauges, nothing here runs per request: each scrape reads the frozen
statistics of every model's batcher. Only batchers built from a ``batching`` block
(``PredictiveBatcher``) have these figures; the plain fixed window reports none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from v2mount.metrics.queues import ScrapedCollector

__all__ = ["BatchingCollector"]

_LABELS = ("model", "version")


@runtime_checkable
class _PredictiveFigures(Protocol):
    dispatched_full: int
    dispatched_deadline: int
    dispatched_idle: int
    refused: int
    slo_misses: int
    intercept: float | None
    per_row: float | None
    guard: float | None


class BatchingCollector(ScrapedCollector):
    """``model_infer_batch_dispatch_total`` (by ``reason``), ``..._refused_total``,
    ``..._slo_miss_total`` and the fitted cost gauges, per model version."""

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        dispatch, refused, misses, intercept, per_row, guard = families
        for source in self._models():
            stats = source.batcher_statistics()
            if not isinstance(stats, _PredictiveFigures):
                continue
            labels = [source.name, source.version or ""]
            dispatch.add_metric([*labels, "full"], stats.dispatched_full)
            dispatch.add_metric([*labels, "deadline"], stats.dispatched_deadline)
            dispatch.add_metric([*labels, "idle"], stats.dispatched_idle)
            refused.add_metric(labels, stats.refused)
            misses.add_metric(labels, stats.slo_misses)
            if stats.intercept is not None and stats.per_row is not None:
                intercept.add_metric(labels, stats.intercept)
                per_row.add_metric(labels, stats.per_row)
                guard.add_metric(labels, stats.guard or 0.0)
        yield from families

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            CounterMetricFamily(
                "model_infer_batch_dispatch",
                "Batches sent by the predictive batcher, by why they went (full, deadline, idle)",
                labels=(*_LABELS, "reason"),
            ),
            CounterMetricFamily(
                "model_infer_batch_refused",
                "Requests the batcher answered 503 at once (predicted to miss the SLO, or"
                " too many waiting)",
                labels=_LABELS,
            ),
            CounterMetricFamily(
                "model_infer_batch_slo_miss",
                "Batched requests answered after their SLO deadline",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "model_infer_batch_cost_intercept_seconds",
                "Fitted fixed cost a of a batch, L(b) = a + c*b",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "model_infer_batch_cost_per_row_seconds",
                "Fitted cost c of each row of a batch, L(b) = a + c*b",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "model_infer_batch_cost_guard_seconds",
                "95th percentile of the batch cost above the fitted line",
                labels=_LABELS,
            ),
        )
