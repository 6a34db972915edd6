"""``AppMetrics``: its own registry, the seed metrics, custom metrics, queue gauges."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

import v2mount.metrics
from v2mount import V2App
from v2mount.metrics import AppMetrics, CustomMetrics, MetricUpdate, QueueCollector


def test_each_app_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    before = {family.name for family in prometheus_client.REGISTRY.collect()}
    first, second = V2App(model_parallel_workers=0), V2App(model_parallel_workers=0)
    assert first.metrics.registry is not second.metrics.registry
    first.metrics.record_inference("m", None, True, 0.5)
    assert (
        first.metrics.registry.get_sample_value(
            "model_infer_request_success_total", {"model": "m", "version": ""}
        )
        == 1.0
    )
    assert (
        second.metrics.registry.get_sample_value(
            "model_infer_request_success_total", {"model": "m", "version": ""}
        )
        is None
    )
    assert {family.name for family in prometheus_client.REGISTRY.collect()} == before


def test_a_registry_passed_in_receives_the_metrics() -> None:
    registry = CollectorRegistry()
    metrics = AppMetrics(registry)
    metrics.observe_batch("m", "2", 5)
    assert (
        registry.get_sample_value("model_infer_batch_size_sum", {"model": "m", "version": "2"})
        == 5.0
    )
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        AppMetrics(registry)


def test_record_inference_counts_and_times() -> None:
    metrics = AppMetrics()
    for ok in (True, True, False):
        metrics.record_inference("m", "1", ok, 0.25)
    labels = {"model": "m", "version": "1"}
    value = metrics.registry.get_sample_value
    assert value("model_infer_request_success_total", labels) == 2.0
    assert value("model_infer_request_failure_total", labels) == 1.0
    assert value("model_infer_request_duration_seconds_count", labels) == 2.0
    assert value("model_infer_request_duration_seconds_sum", labels) == 0.5


def test_custom_metrics_of_every_kind() -> None:
    recorder = CustomMetrics()
    recorder.counter("calls", labels={"route": "a"})
    recorder.counter("calls", 2.5, labels={"route": "a"})
    recorder.gauge("temperature", 3.0, "Model temperature")
    recorder.gauge("temperature", -1.0)
    recorder.histogram("rows", 3, buckets=(1, 4, 16))
    recorder.histogram("rows", 10)
    updates = recorder.drain()
    assert recorder.drain() == []
    assert updates[0] == MetricUpdate("counter", "calls", "", (("route", "a"),), 1.0)

    metrics = AppMetrics()
    metrics.apply_custom(updates)
    value = metrics.registry.get_sample_value
    assert value("calls_total", {"route": "a"}) == 3.5
    assert value("temperature", {}) == -1.0
    assert value("rows_bucket", {"le": "1.0"}) == 0.0
    assert value("rows_bucket", {"le": "4.0"}) == 1.0
    assert value("rows_bucket", {"le": "16.0"}) == 2.0
    assert value("rows_sum", {}) == 13.0


def test_custom_metric_mistakes_raise_in_the_model() -> None:
    recorder = CustomMetrics()
    with pytest.raises(ValueError, match="only go up"):
        recorder.counter("c", -1)
    with pytest.raises(ValueError, match="invalid metric name"):
        recorder.gauge("bad-name", 1)
    with pytest.raises(ValueError, match="invalid label name"):
        recorder.gauge("ok", 1, labels={"bad label": "x"})
    with pytest.raises(ValueError, match="invalid label name"):
        recorder.gauge("ok", 1, labels={"__reserved": "x"})
    assert recorder.drain() == []


def test_conflicting_custom_updates_are_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = AppMetrics()
    recorder = CustomMetrics()
    recorder.counter("shared", 1)
    recorder.gauge("shared", 5)
    recorder.counter("shared", 1, labels={"extra": "x"})
    recorder.counter("model_infer_request_success", 1)
    recorder.counter("shared", 1)
    with caplog.at_level(logging.WARNING, logger="v2mount.metrics"):
        metrics.apply_custom(recorder.drain())
    assert metrics.registry.get_sample_value("shared_total", {}) == 2.0
    rejected = [r.getMessage() for r in caplog.records]
    assert len(rejected) == 3
    assert "already registered as a counter with labels []" in rejected[0]
    assert "Duplicated timeseries" in rejected[2]


@dataclass(frozen=True)
class _Runner:
    queued: int


@dataclass(frozen=True)
class _Batcher:
    queued_requests: int


@dataclass
class _Source:
    name: str
    version: str | None
    runner: _Runner | None
    batcher: _Batcher | None

    def runner_statistics(self) -> _Runner | None:
        return self.runner

    def batcher_statistics(self) -> _Batcher | None:
        return self.batcher


def test_queue_gauges_are_read_at_scrape_time() -> None:
    sources = [
        _Source("a", None, _Runner(3), _Batcher(5)),
        _Source("b", "2", _Runner(0), None),
        _Source("c", None, None, None),  # not loaded: no series
    ]
    metrics = AppMetrics()
    metrics.track_queues(lambda: sources)
    value = metrics.registry.get_sample_value
    assert value("parallel_request_queue", {"model": "a", "version": ""}) == 3.0
    assert value("batch_request_queue", {"model": "a", "version": ""}) == 5.0
    assert value("parallel_request_queue", {"model": "b", "version": "2"}) == 0.0
    assert value("batch_request_queue", {"model": "b", "version": "2"}) is None
    assert value("parallel_request_queue", {"model": "c", "version": ""}) is None
    sources[0] = _Source("a", None, _Runner(1), _Batcher(0))
    assert value("parallel_request_queue", {"model": "a", "version": ""}) == 1.0
    assert value("batch_request_queue", {"model": "a", "version": ""}) == 0.0


def test_queue_collector_names_clash_like_any_metric() -> None:
    registry = CollectorRegistry()
    QueueCollector(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        QueueCollector(registry)


@pytest.mark.parametrize(
    "name",
    [
        "v2mount.metrics",
        "v2mount.metrics.app",
        "v2mount.metrics.custom",
        "v2mount.metrics.exposition",
        "v2mount.metrics.queues",
        "v2mount.rest.docs",
        "v2mount.rest.metrics",
        "v2mount.rest.openapi",
    ],
)
def test_exports_exist_and_are_sorted(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__)
    assert all(hasattr(module, attribute) for attribute in module.__all__)


def test_metrics_package_surface() -> None:
    assert v2mount.metrics.__all__ == [
        "AppMetrics",
        "CustomMetrics",
        "MetricUpdate",
        "QueueCollector",
        "QueueSource",
        "metrics_endpoint",
        "render",
    ]
