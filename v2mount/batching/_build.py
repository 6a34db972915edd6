"""Which batcher a model's settings ask for."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from v2mount.batching._batcher import AdaptiveBatcher
from v2mount.batching._predictive import BatchReport, PredictiveBatcher
from v2mount.batching._scheduler import Policy
from v2mount.batching._tensors import BatchAnswer
from v2mount.runner import Runner
from v2mount.settings import BatchingSettings

__all__ = ["batcher_for"]


def batcher_for(
    runner: Runner,
    settings: BatchingSettings | None,
    *,
    max_batch_size: int,
    max_batch_time: float,
    max_queue_size: int,
    on_batch: Callable[[int, Sequence[float]], None] | None = None,
    answer: BatchAnswer | None = None,
) -> AdaptiveBatcher | PredictiveBatcher:
    """The plain fixed window without a ``batching`` block, else a ``PredictiveBatcher``.

    ``on_batch(rows, queue_delays)`` hears of every batch as it goes (the plain window
    does not measure queue delays: it passes none). ``max_queue_size`` bounds the
    requests a ``PredictiveBatcher`` holds (the plain window leaves that to the runner).
    ``answer``: see the batchers.
    """
    if settings is None:
        return AdaptiveBatcher(
            runner,
            max_batch_size=max_batch_size,
            max_batch_time=max_batch_time,
            on_batch=None if on_batch is None else lambda rows: on_batch(rows, ()),
            answer=answer,
        )
    slo = None if settings.slo_ms is None else settings.slo_ms / 1000
    if slo is None:
        max_wait = max_batch_time
    else:
        max_wait = math.inf if settings.max_wait_ms is None else settings.max_wait_ms / 1000
    policy = Policy(
        max_batch_size=max_batch_size,
        max_wait=max_wait,
        slo=slo,
        admission=settings.admission,
        idle_dispatch=settings.idle_dispatch,
        max_queue=max_queue_size,
    )

    def report(batch: BatchReport) -> None:
        if on_batch is not None:
            on_batch(batch.rows, batch.queue_delays)

    return PredictiveBatcher(
        runner,
        policy,
        on_batch=report,
        window=settings.window,
        min_samples=settings.min_samples,
        answer=answer,
    )
