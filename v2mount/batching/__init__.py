"""Adaptive batching: merge concurrent compatible requests into one model call.

A request joins the open batch for its *compatibility key* (input names, datatypes,
trailing dimensions, per-input and request parameters, minus pure-encoding keys) and the
event loop it came from. A batch goes when it holds ``max_batch_size`` rows or when its
oldest request has waited ``max_batch_time`` seconds. Its inputs are concatenated along
axis 0, the runner answers the merged request once, and each output is split back by
row counts. A request that cannot be merged (its inputs disagree on the first dimension,
or it is 0-d, empty, or at least ``max_batch_size`` rows) runs alone.

Batches run in short-lived tasks that no caller owns (an asyncio task, or a trio system
task). So a caller that is cancelled (timeout, client gone) returns at once without
cancelling the batch its neighbours wait on, and nothing outlives its batch by more than
``max_batch_time``: no background task or event stays bound to a loop, so successive
requests may come from different event loops (Starlette's ``TestClient`` without
``with``). Several batches may be in flight at once; a pool of N workers runs N of them.
"""

from __future__ import annotations

from v2mount.batching._batcher import AdaptiveBatcher, BatcherStatistics

__all__ = ["AdaptiveBatcher", "BatcherStatistics"]
