"""Per-model-version inference statistics in the shape of Triton's statistics extension."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Duration", "InferenceStats", "mark_started", "started_at"]

#: When the current request left its queue (``perf_counter_ns``): set by whatever ran it.
_started: ContextVar[int | None] = ContextVar("v2mount_started", default=None)


def mark_started(ns: int | None = None) -> None:
    """Note that the current task's request stopped waiting (for a worker, a batch) now.

    Called by runners and the batcher in the task that awaits the request, so that the
    statistics extension can tell queue time from inference time.
    """
    _started.set(time.perf_counter_ns() if ns is None else ns)


def started_at() -> int | None:
    """When the current task's request left its queue; ``None`` if nobody said."""
    return _started.get()


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class InferenceStats:
    """Cumulative counts and times; all updates happen on the event loop thread."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, total_ns: int, infer_ns: int, rows: int) -> None:
        (self.success if ok else self.fail).add(total_ns)
        if ok:
            self.compute_infer.add(infer_ns)
            self.queue.add(max(0, total_ns - infer_ns))
            self.inference_count += rows
            self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def as_dict(self, name: str, version: str | None) -> dict[str, Any]:
        """One ``model_stats`` entry of the statistics extension."""
        return {
            "name": name,
            "version": version or "",
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [],
        }
