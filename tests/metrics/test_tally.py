"""The per-request tallies expose exactly what prometheus-client's own metrics would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from v2mount.metrics.tally import TallyCollector

# Bucket bounds themselves, values between them, zero, and one past the last bound.
OBSERVATIONS = [0.0, 0.005, 0.0051, 0.02, 0.25, 0.25, 1.0, 7.5, 10.0, 11.0, 300.0]


def _exposition(registry: CollectorRegistry) -> list[str]:
    """The text format without ``_created`` values (creation times differ by a hair)."""
    lines = generate_latest(registry).decode().splitlines()
    return [line.rpartition(" ")[0] if "_created{" in line else line for line in lines]


def _observe(counter: object, gauge: object, histogram: object) -> None:
    for index, seconds in enumerate(OBSERVATIONS):
        status = "200" if index % 3 else "500"
        counter.labels("POST", "/v2/models/{name}/infer", status).inc()  # type: ignore[attr-defined]
        histogram.labels("POST", "/v2/models/{name}/infer", status).observe(seconds)  # type: ignore[attr-defined]
    counter.labels("GET", "/v2/health/live", "200").inc(2.5)  # type: ignore[attr-defined]
    in_progress = gauge.labels("POST", "/v2/models/{name}/infer")  # type: ignore[attr-defined]
    for _ in range(3):
        in_progress.inc()
    in_progress.dec()


def test_the_exposition_matches_prometheus_client_line_for_line() -> None:
    labels = ("method", "path", "status_code")
    theirs = CollectorRegistry()
    _observe(
        Counter("requests", "Requests answered", labels, registry=theirs),
        Gauge("in_progress", "Requests in progress", labels[:2], registry=theirs),
        Histogram("duration_seconds", "Latency", labels, registry=theirs),
    )
    ours = CollectorRegistry(auto_describe=True)
    tallies = TallyCollector(ours)
    counter = tallies.counter("requests", "Requests answered", labels)
    gauge = tallies.gauge("in_progress", "Requests in progress", labels[:2])
    histogram = tallies.histogram("duration_seconds", "Latency", labels)
    tallies.register()
    _observe(counter, gauge, histogram)

    assert sorted(_exposition(ours)) == sorted(_exposition(theirs))
    infer = {"method": "POST", "path": "/v2/models/{name}/infer", "status_code": "200"}
    # 0.005 itself falls in the 0.005 bucket (bounds are inclusive), 0.0051 in the next.
    assert ours.get_sample_value("duration_seconds_bucket", {**infer, "le": "0.005"}) == 1.0
    assert ours.get_sample_value("duration_seconds_bucket", {**infer, "le": "0.01"}) == 2.0
    assert (
        ours.get_sample_value("in_progress", {"method": "POST", "path": "/v2/models/{name}/infer"})
        == 2.0
    )


def test_tallies_refuse_what_prometheus_client_refuses() -> None:
    registry = CollectorRegistry(auto_describe=True)
    tallies = TallyCollector(registry)
    counter = tallies.counter("requests", "Requests", ("method",))
    tallies.register()
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("GET").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("GET", "extra")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("requests", "Requests again", registry=registry)
