"""The metrics one app owns, in its own ``CollectorRegistry`` (never the global one)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from v2mount.metrics.custom import MetricUpdate

__all__ = ["AppMetrics"]

logger = logging.getLogger("v2mount.metrics")

_MODEL_LABELS = ("model", "version")


class AppMetrics:
    """Seed metrics (MLServer's names) plus custom metrics that models record."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.infer_success = Counter(
            "model_infer_request_success",
            "Successful inference requests",
            _MODEL_LABELS,
            registry=self.registry,
        )
        self.infer_failure = Counter(
            "model_infer_request_failure",
            "Failed inference requests",
            _MODEL_LABELS,
            registry=self.registry,
        )
        self.infer_duration = Histogram(
            "model_infer_request_duration_seconds",
            "Inference latency per model, from validation to the model's answer",
            _MODEL_LABELS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "model_infer_batch_size",
            "Rows in each batch formed by the adaptive batcher",
            _MODEL_LABELS,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self._custom: dict[str, tuple[str, tuple[str, ...], Any]] = {}

    def record_inference(self, model: str, version: str | None, ok: bool, seconds: float) -> None:
        labels = (model, version or "")
        if ok:
            self.infer_success.labels(*labels).inc()
            self.infer_duration.labels(*labels).observe(seconds)
        else:
            self.infer_failure.labels(*labels).inc()

    def observe_batch(self, model: str, version: str | None, rows: int) -> None:
        self.batch_size.labels(model, version or "").observe(rows)

    def apply_custom(self, updates: list[MetricUpdate]) -> None:
        """Apply updates a model recorded; a bad one is logged, never raised."""
        for update in updates:
            try:
                self._apply(update)
            except ValueError as exc:
                logger.warning("custom metric %r rejected: %s", update.name, exc)

    def _apply(self, update: MetricUpdate) -> None:
        labelnames = tuple(name for name, _ in update.labels)
        entry = self._custom.get(update.name)
        if entry is None:
            entry = (update.kind, labelnames, self._register(update, labelnames))
            self._custom[update.name] = entry
        kind, known_labels, metric = entry
        if kind != update.kind or known_labels != labelnames:
            raise ValueError(f"already registered as a {kind} with labels {list(known_labels)}")
        child = metric.labels(*(value for _, value in update.labels)) if labelnames else metric
        if update.kind == "counter":
            child.inc(update.value)
        elif update.kind == "gauge":
            child.set(update.value)
        else:
            child.observe(update.value)

    def _register(self, update: MetricUpdate, labelnames: tuple[str, ...]) -> Any:
        kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[update.kind]
        kwargs: dict[str, Any] = {}
        if update.kind == "histogram" and update.buckets is not None:
            kwargs["buckets"] = update.buckets
        return kind(
            update.name,
            update.documentation or f"custom metric {update.name}",
            labelnames,
            registry=self.registry,
            **kwargs,
        )
