"""The decisions of a tuning run, as pure functions of what was measured.

The method is the one Seldon's performance-tuning guide describes for MLServer: find
one worker's maximum throughput (the concurrency where it stops growing, or where the
latency passes the target), then add workers one at a time while the maximum throughput
still grows; then see whether adaptive batching raises it further, with a fixed window
or with the predictive batcher. Everything here reads ``Sweep``/``Step`` values only,
so it is tested with synthetic measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from v2mount.tuning._results import Config, Fields, Step, Sweep

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
    steps: Sequence[Step],
    target_ms: float,
    gain: float = RAMP_GAIN,
    patience: int = 2,
    until: int = 0,
) -> bool:
    """Whether raising concurrency further is pointless.

    True once the last step failed requests or passed the latency target, or when none
    of the last ``patience`` steps raised throughput by ``gain`` over every step before
    it (saturated; one flat step alone may be noise on a busy machine). Below
    concurrency ``until`` only failed requests stop it: a sweep compared with another
    runs at least as far as that one did, since a step past the target or flat there
    only loses its place as the peak (the predictive batcher, in a closed loop, may
    wait at low concurrency for company it finds at a higher one).
    """
    if not steps:
        return False
    last = steps[-1]
    if last.errors or last.requests == 0:
        return True
    if last.concurrency < until:
        return False
    if last.p99_ms > target_ms:
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

    def settings(self) -> Fields:
        return self.config.settings()


def _gain(step: Step, base: Step) -> float:
    """How much more throughput ``step`` has than ``base``, as a fraction."""
    return step.throughput / base.throughput - 1 if base.throughput else 0.0


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


def _ramp_end(sweep: Sweep, target_ms: float) -> str:
    """Why a sweep's ramp stopped, when errors or latency stopped it (or it never ran)."""
    last = sweep.steps[-1] if sweep.steps else None
    if last is None:
        return f"; it did not start: {sweep.error}" if sweep.error else ""
    if last.errors:
        first = f" ({last.error[:160]})" if last.error else ""
        clients = "client" if last.errors == 1 else "clients"
        return f"; at concurrency {last.concurrency}, {last.errors:,} {clients} got an error{first}"
    if last.p99_ms > target_ms:
        return f"; at concurrency {last.concurrency} its p99 was {last.p99_ms:.1f} ms"
    return ""


def _choose_batching(
    sweeps: Sequence[Sweep], base: Sweep, base_peak: Step, target_ms: float, min_gain: float
) -> tuple[Sweep, Step, list[str]]:
    """The batching decision at ``base``'s worker count: the sweep to keep, its peak, why.

    The fixed window (its best ``max_batch_size``) and the predictive batcher are each a
    candidate when their peak adds ``min_gain`` over ``base``; of those, the higher peak
    wins. The predictive sweep also says where its ramp ended (a 503 there is its
    admission control refusing requests it predicted to miss the SLO).
    """
    workers = base.config.parallel_workers
    here = [s for s in sweeps if s.config.batching and s.config.parallel_workers == workers]
    if not here:
        return base, base_peak, []
    reasons: list[str] = []
    fixed: tuple[Sweep, Step] | None = None
    predictive: tuple[Sweep, Step] | None = None
    for kind, group in (
        ("Adaptive batching (fixed window)", [s for s in here if not s.config.predictive]),
        ("Predictive batching", [s for s in here if s.config.predictive]),
    ):
        if not group:
            continue
        end = _ramp_end(group[0], target_ms) if group[0].config.predictive else ""
        measured = [(s, top) for s in group if (top := peak(s, target_ms)) is not None]
        if not measured:
            labels = ", ".join(s.config.label for s in group)
            reasons.append(f"{kind} ({labels}) never met the {target_ms:g} ms p99 target{end}.")
            continue
        sweep, top = max(measured, key=lambda pair: pair[1].throughput)
        rows = f", {top.mean_batch:.1f} rows per batch" if top.mean_batch else ""
        reasons.append(
            f"{kind} at best ({sweep.config.label}) peaks at {_describe(top)}{rows}: "
            f"{_gain(top, base_peak):+.0%} over no batching{end}."
        )
        if sweep.config.predictive:
            predictive = (sweep, top)
        else:
            fixed = (sweep, top)
    candidates = [pair for pair in (fixed, predictive) if pair is not None]
    paying = [pair for pair in candidates if _gain(pair[1], base_peak) >= min_gain]
    if not paying:
        reasons.append(f"Batching adds less than the {min_gain:.0%} it must, so batching off.")
        return base, base_peak, reasons
    best, best_peak = max(paying, key=lambda pair: pair[1].throughput)
    if best.config.predictive:
        versus = (
            "" if fixed is None else f" ({_gain(best_peak, fixed[1]):+.0%} over the fixed window)"
        )
        block = json.dumps({"batching": best.config.batching_block()})[1:-1]
        reasons.append(
            f"Predictive batching peaks highest{versus}, so predictive batching on: "
            f"{block} with max_batch_size {best.config.max_batch_size}."
        )
    elif predictive is not None:
        reasons.append(
            f"The fixed window peaks higher than predictive batching "
            f"({_gain(best_peak, predictive[1]):+.0%}), so batching on with the fixed window."
        )
    else:
        reasons.append(f"Batching adds at least the {min_gain:.0%} it must, so batching on.")
    return best, best_peak, reasons


def recommend(sweeps: Sequence[Sweep], target_ms: float, min_gain: float = 0.10) -> Recommendation:
    """The settings to recommend from every sweep of a run, with the reasons.

    Workers: the pool walk (``parallel_workers`` 1, 2, … while each adds ``min_gain`` of
    throughput within the target), or in-process (0) when that peaks at least as high.
    Batching: the best batching sweep at that worker count (``_choose_batching``).
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
    best, best_peak, why_batching = _choose_batching(sweeps, base, base_peak, target_ms, min_gain)
    reasons += why_batching
    reasons.append(
        f"Saturation: about {best_peak.throughput:,.0f} req/s per replica; plan autoscaling "
        "at 80-90 % of it."
    )
    return Recommendation(best.config, reasons, best_peak, one_peak)
