"""Tuning a model's serving settings by measuring it: ``python -m v2mount tune``.

The method is the one Seldon's performance-tuning guide gives for MLServer: measure one
worker's maximum throughput and latency at rising concurrency, then N workers, until
throughput stops growing or latency passes the target; then adaptive batching, with a
fixed window and with the predictive batcher (a ``batching`` block with ``slo_ms``). The
decisions (``recommend`` and the functions beside it) are pure functions of the
measurements; ``tune`` runs the measurements against a ``Bench`` (``AppBench`` serves
the real model with a ``V2App`` in this process). See ``docs/tuning.md``.
"""

from __future__ import annotations

from v2mount.tuning._inputs import TuneError, synthetic_request
from v2mount.tuning._policy import Recommendation, recommend
from v2mount.tuning._results import Config, Step, Sweep
from v2mount.tuning._tuner import Bench, Listener, Target, TuneOptions, TuneResult, tune

__all__ = [
    "Bench",
    "Config",
    "Listener",
    "Recommendation",
    "Step",
    "Sweep",
    "Target",
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "recommend",
    "synthetic_request",
    "tune",
]
