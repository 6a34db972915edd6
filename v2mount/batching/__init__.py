"""Adaptive batching: merge concurrent compatible requests into one model call.

A request joins the queue for its *compatibility key* (input names, datatypes, trailing
dimensions, per-input and request parameters, minus pure-encoding keys) and the event
loop it came from. Inputs of a batch are concatenated along axis 0, the runner answers
the merged request once, and each output is split back by row counts. A request that
cannot be merged (its inputs disagree on the first dimension, or it is 0-d, empty, or at
least ``max_batch_size`` rows) runs alone.

Two batchers decide when a batch goes:

- ``AdaptiveBatcher``, the fixed window: when the batch holds ``max_batch_size`` rows
  or its oldest request has waited ``max_batch_time`` seconds; several batches may be in
  flight at once (a pool of N workers runs N of them, the runner queues the rest).
- ``PredictiveBatcher``: at most one batch in flight per worker; with a latency SLO it
  times each batch from a fitted cost model ``L(b) = a + c·b`` and refuses at once the
  requests that would miss their deadline; without one, it is a fixed window that also
  sends at once when a worker is idle and nothing else is expected in time.

Batches run in short-lived tasks that no caller owns (an asyncio task, or a trio system
task). So a caller that is cancelled (timeout, client gone) returns at once without
cancelling the batch its neighbours wait on, and no background task or event outlives
the work it serves: successive requests may come from different event loops
(Starlette's ``TestClient`` without ``with``).
"""

from __future__ import annotations

from v2mount.batching._batcher import AdaptiveBatcher, BatcherStatistics
from v2mount.batching._build import batcher_for
from v2mount.batching._predictive import (
    BatchReport,
    PredictiveBatcher,
    PredictiveStatistics,
    runner_capacity,
)
from v2mount.batching._scheduler import Policy

__all__ = [
    "AdaptiveBatcher",
    "BatchReport",
    "BatcherStatistics",
    "Policy",
    "PredictiveBatcher",
    "PredictiveStatistics",
    "batcher_for",
    "runner_capacity",
]
