"""What a tuning run measures: a configuration, one load step, one sweep of steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Config", "Fields", "Step", "Sweep", "summarize"]

#: ``model-settings.json`` fields, as ``Config.settings`` gives them.
Fields = dict[str, int | float | dict[str, float] | None]


@dataclass(frozen=True, slots=True)
class Config:
    """The settings a sweep runs with (``max_batch_size <= 1``: batching off).

    ``slo_ms`` set (with ``max_batch_size > 1``): the predictive batcher, a ``batching``
    block with that latency SLO, which times its batches itself (``max_batch_time`` is
    then unused); unset: the fixed window of ``max_batch_time``.
    """

    parallel_workers: int
    max_batch_size: int = 0
    max_batch_time: float = 0.0
    slo_ms: float | None = None

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def predictive(self) -> bool:
        return self.batching and self.slo_ms is not None

    @property
    def label(self) -> str:
        workers = (
            "in-process"
            if self.parallel_workers == 0
            else f"{self.parallel_workers} worker{'s' if self.parallel_workers > 1 else ''}"
        )
        if not self.batching:
            return workers
        if self.slo_ms is not None:
            return f"{workers}, predictive {self.max_batch_size}/SLO {self.slo_ms:g} ms"
        return f"{workers}, batch {self.max_batch_size}/{self.max_batch_time * 1000:g} ms"

    def batching_block(self) -> dict[str, float] | None:
        """The ``batching`` block that switches the predictive batcher on, or ``None``."""
        if not self.predictive or self.slo_ms is None:
            return None
        slo = float(self.slo_ms)
        return {"slo_ms": int(slo) if slo.is_integer() else slo}  # 100, not 100.0

    def settings(self) -> Fields:
        """The ``model-settings.json`` fields for this configuration.

        ``batching`` is always there: ``None`` (JSON ``null``) says the model must have
        no ``batching`` block, since one would change how the fixed window is timed.
        """
        fixed = self.batching and not self.predictive
        return {
            "parallel_workers": self.parallel_workers,
            "max_batch_size": self.max_batch_size if self.batching else 0,
            "max_batch_time": self.max_batch_time if fixed else 0.0,
            "batching": self.batching_block(),
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
