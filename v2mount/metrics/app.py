"""The metrics one app owns, in its own ``CollectorRegistry`` (never the global one).

Seed metrics carry MLServer's names: ``model_infer_request_success`` / ``_failure``
(labels ``model``, ``version``), ``batch_request_queue`` and ``parallel_request_queue``
(read from the models' statistics at scrape time), ``rest_server_requests``,
``rest_server_requests_duration_seconds`` and ``rest_server_requests_in_progress``
(labels ``method``, ``path`` = the route template, ``status_code``),
``grpc_server_started_total``, ``grpc_server_handled_total`` and
``grpc_server_handling_seconds`` (labels ``grpc_type``, ``grpc_service``,
``grpc_method``, and ``grpc_code`` when handled), plus the inference latency and the
adaptive batcher's batch sizes, queue delays, dispatch reasons, refusals, SLO misses and
fitted cost, and the duration of a model's per-request stages
(``model_infer_stage_duration_seconds``, label ``stage``). Models add their own through
``apply_custom``.

Prometheus multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before anything imports
``prometheus_client``) is honoured when scraping: ``exposition_registry`` then merges the
files every process wrote, so any of several uvicorn workers answers for all of them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from v2mount.metrics.batching import BatchingCollector
from v2mount.metrics.custom import MetricUpdate
from v2mount.metrics.queues import QueueCollector, QueueSource
from v2mount.metrics.tally import TallyCollector, TallyCounter, TallyGauge, TallyHistogram

__all__ = ["AppMetrics"]

logger = logging.getLogger("v2mount.metrics")

#: The environment variable prometheus-client reads (at import) to enable multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_MODEL_LABELS = ("model", "version")
_REST_LABELS = ("method", "path", "status_code")
#: py-grpc-prometheus's labels, as MLServer's gRPC server reports them.
_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_KINDS: dict[str, type[Counter] | type[Gauge] | type[Histogram]] = {
    "counter": Counter,
    "gauge": Gauge,
    "histogram": Histogram,
}


class AppMetrics:
    """Seed metrics (MLServer's names) plus custom metrics that models record.

    ``registry`` defaults to a fresh ``CollectorRegistry``: two apps in one process never
    clash, and the host's global ``REGISTRY`` is untouched unless it is passed here.
    ``multiprocess_dir`` defaults to ``$PROMETHEUS_MULTIPROC_DIR`` (read, never written).
    ``record_inference`` and the REST metrics' children are updated on the event loop
    thread that serves the app (they are plain tallies, see ``v2mount.metrics.tally``);
    every other method is thread-safe (prometheus-client's metrics are; custom
    registration takes a lock).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir or os.environ.get(MULTIPROC_ENV) or None
        # The metrics every inference updates: plain tallies rendered at scrape time
        # (``v2mount.metrics.tally``), or prometheus-client's own in multiprocess mode,
        # where the values must go to its shared files.
        self.tallies: TallyCollector | None = None
        counter: Callable[[str, str, tuple[str, ...]], Counter | TallyCounter]
        gauge: Callable[[str, str, tuple[str, ...]], Gauge | TallyGauge]
        histogram: Callable[[str, str, tuple[str, ...]], Histogram | TallyHistogram]
        if self.multiprocess_dir is None:
            tallies = self.tallies = TallyCollector(self.registry)
            counter, gauge, histogram = tallies.counter, tallies.gauge, tallies.histogram
        else:
            counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.infer_success: Counter | TallyCounter = counter(
            "model_infer_request_success", "Successful inference requests", _MODEL_LABELS
        )
        self.infer_failure: Counter | TallyCounter = counter(
            "model_infer_request_failure", "Failed inference requests", _MODEL_LABELS
        )
        self.infer_duration: Histogram | TallyHistogram = histogram(
            "model_infer_request_duration_seconds",
            "Inference latency per model, from validation to the model's answer",
            _MODEL_LABELS,
        )
        self.rest_requests: Counter | TallyCounter = counter(
            "rest_server_requests",
            "REST requests answered, by method, route template and status code",
            _REST_LABELS,
        )
        self.rest_duration: Histogram | TallyHistogram = histogram(
            "rest_server_requests_duration_seconds",
            "REST request latency, by method, route template and status code",
            _REST_LABELS,
        )
        self.rest_in_progress: Gauge | TallyGauge = gauge(
            "rest_server_requests_in_progress",
            "REST requests being answered, by method and route template",
            ("method", "path"),
        )
        if self.tallies is not None:
            self.tallies.register()
        self.batch_size = Histogram(
            "model_infer_batch_size",
            "Rows in each batch formed by the adaptive batcher",
            _MODEL_LABELS,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.grpc_started = Counter(
            "grpc_server_started",
            "gRPC calls started, by type, service and method",
            _GRPC_LABELS,
            registry=self.registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "gRPC calls finished, by type, service, method and status code",
            (*_GRPC_LABELS, "grpc_code"),
            registry=self.registry,
        )
        self.grpc_duration = Histogram(
            "grpc_server_handling_seconds",
            "gRPC call latency, by type, service and method",
            _GRPC_LABELS,
            registry=self.registry,
        )
        self.batch_queue_delay = Histogram(
            "model_infer_batch_queue_delay_seconds",
            "Time each batched request waited in the batcher before its batch went",
            _MODEL_LABELS,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "model_infer_stage_duration_seconds",
            "Time a model's preprocess or postprocess stage took for one request",
            (*_MODEL_LABELS, "stage"),
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=self.registry,
        )
        self.queues = QueueCollector(registry=self.registry)
        self.batching = BatchingCollector(registry=self.registry)
        self._recorders: dict[tuple[str, str], Callable[[bool, float], None]] = {}
        self._custom: dict[str, tuple[str, tuple[str, ...], Any]] = {}
        self._lock = threading.Lock()

    def _counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(
            name, documentation, labels, registry=self.registry, multiprocess_mode="livesum"
        )

    def _histogram(self, name: str, documentation: str, labels: tuple[str, ...]) -> Histogram:
        return Histogram(name, documentation, labels, registry=self.registry)

    # -- called by the registry and the REST layer ---------------------------------------

    def record_inference(self, model: str, version: str | None, ok: bool, seconds: float) -> None:
        self.inference_recorder(model, version)(ok, seconds)

    def inference_recorder(self, model: str, version: str | None) -> Callable[[bool, float], None]:
        """``record(ok, seconds)`` for one model version, its metric children resolved
        once (``labels`` builds a key, and takes a lock in prometheus-client)."""
        labels = (model, version or "")
        recorder = self._recorders.get(labels)
        if recorder is None:
            success = self.infer_success.labels(*labels)
            duration = self.infer_duration.labels(*labels)
            failure = self.infer_failure.labels(*labels)

            def recorder(ok: bool, seconds: float) -> None:
                if ok:
                    success.inc()
                    duration.observe(seconds)
                else:
                    failure.inc()

            self._recorders[labels] = recorder
        return recorder

    def observe_batch(
        self, model: str, version: str | None, rows: int, queue_delays: Iterable[float] = ()
    ) -> None:
        self.batch_size.labels(model, version or "").observe(rows)
        delay = self.batch_queue_delay.labels(model, version or "")
        for seconds in queue_delays:
            delay.observe(seconds)

    def observe_stage(self, model: str, version: str | None, stage: str, seconds: float) -> None:
        self.stage_duration.labels(model, version or "", stage).observe(seconds)

    def track_queues(self, sources: Callable[[], Iterable[QueueSource]]) -> None:
        """Report the queues of whatever ``sources()`` returns at each scrape."""
        self.queues.track(sources)
        self.batching.track(sources)

    def apply_custom(self, updates: list[MetricUpdate]) -> None:
        """Apply updates a model recorded; a bad one is logged, never raised."""
        for update in updates:
            try:
                self._apply(update)
            except ValueError as exc:
                logger.warning("custom metric %r rejected: %s", update.name, exc)

    # -- scraping -----------------------------------------------------------------------

    def exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` renders: this app's registry, or in multiprocess mode every
        process's files merged, plus this process's queue gauges."""
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        merged.register(self.queues)
        merged.register(self.batching)
        return merged

    # -- custom metrics -----------------------------------------------------------------

    def _apply(self, update: MetricUpdate) -> None:
        labelnames = tuple(name for name, _ in update.labels)
        with self._lock:
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
        kwargs: dict[str, Any] = {}
        if update.kind == "histogram" and update.buckets is not None:
            kwargs["buckets"] = update.buckets
        return _KINDS[update.kind](
            update.name,
            update.documentation or f"custom metric {update.name}",
            labelnames,
            registry=self.registry,
            **kwargs,
        )
