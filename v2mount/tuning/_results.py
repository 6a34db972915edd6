"""What a tuning run measures: a configuration, one load step, one sweep of steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Config", "Step", "Sweep", "summarize"]


@dataclass(frozen=True, slots=True)
class Config:
    """The three settings a sweep runs with (``max_batch_size <= 1``: batching off)."""

    parallel_workers: int
    max_batch_size: int = 0
    max_batch_time: float = 0.0

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def label(self) -> str:
        workers = (
            "in-process"
            if self.parallel_workers == 0
            else f"{self.parallel_workers} worker{'s' if self.parallel_workers > 1 else ''}"
        )
        if not self.batching:
            return workers
        return f"{workers}, batch {self.max_batch_size}/{self.max_batch_time * 1000:g} ms"

    def settings(self) -> dict[str, int | float]:
        """The ``model-settings.json`` fields for this configuration."""
        return {
            "parallel_workers": self.parallel_workers,
            "max_batch_size": self.max_batch_size if self.batching else 0,
            "max_batch_time": self.max_batch_time if self.batching else 0.0,
        }


@dataclass(frozen=True, slots=True)
class Step:
    """One closed-loop load step: ``concurrency`` clients for ``duration`` seconds.

    ``requests`` counts the answers that arrived within the window; the latencies
    (milliseconds) are those of every answer, late ones included. ``mean_batch`` is the
    mean number of rows per model call with batching on (``None`` when off).
    """

    concurrency: int
    duration: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None
    error: str | None = None

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0


@dataclass(slots=True)
class Sweep:
    """Every step measured for one configuration, at rising concurrency.

    ``error`` is set when the configuration could not be served at all (say, the pool
    failed to start); its ``steps`` are then empty.
    """

    config: Config
    steps: list[Step] = field(default_factory=list)
    error: str | None = None


def summarize(
    concurrency: int,
    duration: float,
    in_window: int,
    latencies: Sequence[float],
    errors: int,
    error: str | None = None,
    mean_batch: float | None = None,
) -> Step:
    """A ``Step`` from raw latencies in seconds (nearest-rank percentiles)."""
    if latencies:
        values = np.asarray(latencies, dtype=np.float64) * 1000.0
        p50, p99 = np.percentile(values, [50, 99], method="inverted_cdf")
    else:
        p50 = p99 = float("nan")
    return Step(
        concurrency=concurrency,
        duration=duration,
        requests=in_window,
        errors=errors,
        p50_ms=float(p50),
        p99_ms=float(p99),
        mean_batch=mean_batch,
        error=error,
    )
