"""The decisions of a tuning run, as pure functions of what was measured.

The method is the one Seldon's performance-tuning guide describes for MLServer: find
one worker's maximum throughput (the concurrency where it stops growing, or where the
latency passes the target), then add workers one at a time while the maximum throughput
still grows; then see whether adaptive batching raises it further. Everything here reads
``Sweep``/``Step`` values only, so it is tested with synthetic measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from v2mount.tuning._results import Config, Step, Sweep

__all__ = [
    "Recommendation",
    "auto_batch_time",
    "best_unbatched",
    "keep_adding_workers",
    "peak",
    "ramp_done",
    "recommend",
]

#: A ramp step must raise throughput by this fraction over the best before it, or the
#: configuration counts as saturated.
RAMP_GAIN = 0.05


def _within(step: Step, target_ms: float) -> bool:
    return step.errors == 0 and step.requests > 0 and step.p99_ms <= target_ms


def peak(sweep: Sweep, target_ms: float) -> Step | None:
    """The step of highest throughput whose p99 meets the target (``None``: no step does)."""
    good = [step for step in sweep.steps if _within(step, target_ms)]
    return max(good, key=lambda step: step.throughput, default=None)


def ramp_done(
    steps: Sequence[Step], target_ms: float, gain: float = RAMP_GAIN, patience: int = 2
) -> bool:
    """Whether raising concurrency further is pointless.

    True once the last step failed requests or passed the latency target, or when none
    of the last ``patience`` steps raised throughput by ``gain`` over every step before
    it (saturated; one flat step alone may be noise on a busy machine).
    """
    if not steps:
        return False
    last = steps[-1]
    if last.errors or last.requests == 0 or last.p99_ms > target_ms:
        return True
    record = 0.0
    since_record = 0
    for step in steps:
        if step.throughput >= record * (1 + gain):
            record, since_record = step.throughput, 0
        else:
            since_record += 1
    return since_record >= patience


def _pool_sweeps(sweeps: Sequence[Sweep]) -> list[Sweep]:
    found = [
        s
        for s in sweeps
        if s.config.parallel_workers > 0 and not s.config.batching and s.error is None
    ]
    return sorted(found, key=lambda s: s.config.parallel_workers)


def _walk_workers(
    sweeps: Sequence[Sweep], target_ms: float, min_gain: float
) -> tuple[Sweep | None, str]:
    """Seldon's walk over pool sizes 1, 2, …: the last size that still paid, and why it ended."""
    chosen: Sweep | None = None
    chosen_peak: Step | None = None
    why = "reached the largest pool tried (--max-workers)"
    for sweep in _pool_sweeps(sweeps):
        top = peak(sweep, target_ms)
        workers = sweep.config.parallel_workers
        if top is None:
            why = f"{workers} workers miss the {target_ms:g} ms p99 target at every concurrency"
            break
        if chosen_peak is None:
            chosen, chosen_peak = sweep, top
            continue
        growth = top.throughput / chosen_peak.throughput - 1 if chosen_peak.throughput else 0.0
        if growth < min_gain:
            why = (
                f"throughput stopped growing at {workers} workers "
                f"({growth:+.0%}, under the {min_gain:.0%} a worker must add)"
            )
            break
        chosen, chosen_peak = sweep, top
    return chosen, why


def keep_adding_workers(sweeps: Sequence[Sweep], target_ms: float, min_gain: float) -> bool:
    """Whether the last pool size measured still paid (so the next one is worth trying)."""
    pools = _pool_sweeps(sweeps)
    if not pools:
        return True
    chosen, _ = _walk_workers(pools, target_ms, min_gain)
    return chosen is pools[-1]


def best_unbatched(sweeps: Sequence[Sweep], target_ms: float, min_gain: float) -> Sweep | None:
    """The worker count to keep: the pool walk's answer, or in-process if it is as fast."""
    chosen, _ = _walk_workers(sweeps, target_ms, min_gain)
    chosen_peak = peak(chosen, target_ms) if chosen is not None else None
    for sweep in sweeps:
        if sweep.config.parallel_workers == 0 and not sweep.config.batching:
            top = peak(sweep, target_ms)
            if top is not None and (
                chosen_peak is None or top.throughput >= chosen_peak.throughput
            ):
                return sweep
    return chosen


def auto_batch_time(base: Step | None, target_ms: float) -> float:
    """A ``max_batch_time`` (seconds) from one request's latency, bounded by the target.

    Waiting as long as one request takes at most doubles a lone request's latency, and
    is long enough to gather the requests that arrive while the model is busy; at least
    1 ms (event-loop timers round up to the millisecond), at most 50 ms and a quarter of
    the latency target.
    """
    latency = base.p50_ms if base is not None and not math.isnan(base.p50_ms) else 1.0
    ceiling = min(50.0, target_ms / 4)
    milliseconds = max(1.0, min(latency, ceiling))
    return round(milliseconds / 1000, 4)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The settings to use, why, and the measured peaks behind them."""

    config: Config
    reasons: list[str] = field(default_factory=list)
    peak: Step | None = None
    one_worker: Step | None = None

    @property
    def reason(self) -> str:
        return " ".join(self.reasons)

    def settings(self) -> dict[str, int | float]:
        return self.config.settings()


def _describe(step: Step) -> str:
    return (
        f"{step.throughput:,.0f} req/s (p50 {step.p50_ms:.1f} ms, p99 {step.p99_ms:.1f} ms "
        f"at concurrency {step.concurrency})"
    )


def _fallback(sweeps: Sequence[Sweep], target_ms: float) -> Recommendation:
    """Nothing met the target: the configuration with the lowest p99 at its first step."""
    measured = [s for s in sweeps if s.steps and not s.config.batching]
    if not measured:
        raise ValueError("no configuration was measured")
    best = min(measured, key=lambda s: s.steps[0].p99_ms)
    first = best.steps[0]
    return Recommendation(
        best.config,
        [
            f"No configuration met the {target_ms:g} ms p99 target, even one request at a "
            f"time; the lowest p99 was {first.p99_ms:.1f} ms ({best.config.label}).",
            "Raise --latency-target-ms, or make the model faster.",
        ],
        first,
        None,
    )


def recommend(sweeps: Sequence[Sweep], target_ms: float, min_gain: float = 0.10) -> Recommendation:
    """The settings to recommend from every sweep of a run, with the reasons.

    Workers: the pool walk (``parallel_workers`` 1, 2, … while each adds ``min_gain`` of
    throughput within the target), or in-process (0) when that peaks at least as high.
    Batching: the best batching sweep at that worker count, if it adds ``min_gain``.
    """
    base = best_unbatched(sweeps, target_ms, min_gain)
    if base is None:
        return _fallback(sweeps, target_ms)
    base_peak = peak(base, target_ms)
    assert base_peak is not None
    reasons: list[str] = []
    pools = _pool_sweeps(sweeps)
    one = next((s for s in pools if s.config.parallel_workers == 1), None)
    one_peak = peak(one, target_ms) if one is not None else None
    if one_peak is not None:
        reasons.append(f"One worker peaks at {_describe(one_peak)}.")
    chosen, why = _walk_workers(sweeps, target_ms, min_gain)
    if chosen is not None and chosen.config.parallel_workers > 1:
        top = peak(chosen, target_ms)
        assert top is not None
        reasons.append(f"{chosen.config.parallel_workers} workers peak at {_describe(top)}.")
    if pools:
        reasons.append(f"Stopped adding workers: {why}.")
    if base.config.parallel_workers == 0:
        reasons.append(
            f"In-process (parallel_workers 0) peaks at {_describe(base_peak)}, "
            "at least as high as any pool, and costs no worker process."
        )
    batched = [
        (s, top)
        for s in sweeps
        if s.config.batching
        and s.config.parallel_workers == base.config.parallel_workers
        and (top := peak(s, target_ms)) is not None
    ]
    best, best_peak = base, base_peak
    if batched:
        top_sweep, top = max(batched, key=lambda pair: pair[1].throughput)
        growth = top.throughput / base_peak.throughput - 1 if base_peak.throughput else 0.0
        batch = f", {top.mean_batch:.1f} rows per batch" if top.mean_batch else ""
        if growth >= min_gain:
            best, best_peak = top_sweep, top
            reasons.append(
                f"Adaptive batching ({top_sweep.config.label}) peaks at {_describe(top)}"
                f"{batch}: {growth:+.0%}, so batching on."
            )
        else:
            reasons.append(
                f"Adaptive batching at best {top_sweep.config.label} gave {growth:+.0%}{batch}, "
                f"under {min_gain:.0%}, so batching off."
            )
    elif any(s.config.batching for s in sweeps):
        reasons.append(f"Adaptive batching never met the {target_ms:g} ms p99 target: off.")
    reasons.append(
        f"Saturation: about {best_peak.throughput:,.0f} req/s per replica; plan autoscaling "
        "at 80-90 % of it."
    )
    return Recommendation(best.config, reasons, best_peak, one_peak)
