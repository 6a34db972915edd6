"""The tuning run: which configurations to serve, in what order, and when to stop."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from v2mount.tuning._inputs import TuneError
from v2mount.tuning._policy import (
    Recommendation,
    auto_batch_time,
    best_unbatched,
    keep_adding_workers,
    ramp_done,
    recommend,
)
from v2mount.tuning._results import Config, Step, Sweep

__all__ = ["Bench", "Listener", "Target", "TuneOptions", "TuneResult", "concurrency_levels", "tune"]


class Target(Protocol):
    """One configuration being served."""

    async def measure(self, concurrency: int, duration: float) -> Step: ...


class Bench(Protocol):
    """Serves a model under a configuration (a real app, or a simulation in tests)."""

    def serve(self, config: Config) -> AbstractAsyncContextManager[Target]: ...


class Listener(Protocol):
    """Told of progress (the command line draws a progress bar from it)."""

    def started(self, config: Config) -> None: ...

    def measured(self, config: Config, step: Step) -> None: ...

    def remaining(self, steps: int) -> None:
        """At most ``steps`` load steps are left to run."""
        ...


class _Silent:
    def started(self, config: Config) -> None:
        pass

    def measured(self, config: Config, step: Step) -> None:
        pass

    def remaining(self, steps: int) -> None:
        pass


def concurrency_levels(maximum: int) -> tuple[int, ...]:
    """1, 2, 4, … up to ``maximum`` (which is always the last level)."""
    if maximum < 1:
        raise ValueError(f"the maximum concurrency must be at least 1, not {maximum}")
    levels = [1]
    while levels[-1] * 2 < maximum:
        levels.append(levels[-1] * 2)
    if levels[-1] != maximum:
        levels.append(maximum)
    return tuple(levels)


#: The predictive batcher's default SLO, as a share of the latency target. Its requests
#: may wait until their deadline less the batch's predicted cost, so its p99 lands near
#: the SLO; the target is the whole request's p99, which also holds what the SLO does
#: not (decoding, encoding, the event loop): the rest is left for that.
SLO_SHARE = 0.8


@dataclass(frozen=True)
class TuneOptions:
    """How a run measures: see ``python -m v2mount tune --help``."""

    latency_target_ms: float = 100.0
    duration: float = 2.0
    max_workers: int = 1
    max_concurrency: int = 64
    batch_sizes: Sequence[int] = (8, 32)
    batch_time: float | None = None  # None: auto_batch_time
    in_process: bool = True
    min_gain: float = 0.10
    repeat: int = 1
    predictive: bool = True  # also try the predictive batcher (largest batch size)
    slo_ms: float | None = None  # its SLO; None: SLO_SHARE of the latency target

    def batch_configs(self, workers: int, batch_time: float) -> list[Config]:
        """The batching sweeps at ``workers``: each fixed size, then the predictive one."""
        sizes = [size for size in self.batch_sizes if size > 1]
        configs = [Config(workers, size, batch_time) for size in sizes]
        if self.predictive and sizes:
            slo = (
                round(SLO_SHARE * self.latency_target_ms, 1) if self.slo_ms is None else self.slo_ms
            )
            configs.append(Config(workers, max(sizes), slo_ms=slo))
        return configs


@dataclass(frozen=True)
class TuneResult:
    """Every sweep in the order run, and the recommendation drawn from them."""

    sweeps: list[Sweep]
    recommendation: Recommendation


async def _measure(target: Target, concurrency: int, options: TuneOptions) -> Step:
    """One step, or the median-throughput one of ``options.repeat`` (robust to noise)."""
    rounds = [await target.measure(concurrency, options.duration) for _ in range(options.repeat)]
    return sorted(rounds, key=lambda step: step.throughput)[len(rounds) // 2]


async def _sweep(
    bench: Bench,
    config: Config,
    options: TuneOptions,
    listener: Listener,
    left_after: int,
    until: int = 0,
) -> Sweep:
    """Serve ``config`` and raise concurrency until ``ramp_done`` (see there for ``until``)."""
    levels = concurrency_levels(options.max_concurrency)
    sweep = Sweep(config)
    listener.started(config)
    serving = False
    try:
        async with bench.serve(config) as target:
            serving = True
            for index, concurrency in enumerate(levels):
                step = await _measure(target, concurrency, options)
                sweep.steps.append(step)
                listener.measured(config, step)
                if step.requests == 0 and step.errors and len(sweep.steps) == 1:
                    raise TuneError(
                        f"{config.label}: every request failed: {step.error} "
                        "(give a request the model accepts with --request FILE)"
                    )
                if ramp_done(sweep.steps, options.latency_target_ms, until=until):
                    break
                listener.remaining(len(levels) - index - 1 + left_after)
    except TuneError as exc:
        if serving or config.parallel_workers == 0:
            raise
        sweep.error = str(exc)  # a pool of this size cannot start: the walk stops here
    listener.remaining(left_after)
    return sweep


async def tune(bench: Bench, options: TuneOptions, listener: Listener | None = None) -> TuneResult:
    """Measure configurations in Seldon's order and recommend one.

    1. In-process (``parallel_workers`` 0), unless ``options.in_process`` is false.
    2. Pools of 1, 2, … ``max_workers`` without batching, while each size still adds
       ``min_gain`` of peak throughput within the latency target.
    3. At the best worker count: each of ``batch_sizes`` with ``batch_time``, then (with
       ``options.predictive``) the predictive batcher, up to the largest of those sizes,
       with ``options.slo_ms`` (default: ``SLO_SHARE`` of the latency target) as its
       SLO, at least up to the concurrency the fixed windows reached unless requests
       fail first (in a closed loop it may wait at low concurrency for company that it
       finds at a higher one: see ``ramp_done``).

    Runs on the caller's event loop (asyncio or trio). Cancelling it leaves the
    configuration being served through its ``Bench``, whose exit stops the app and pool.
    """
    listener = listener or _Silent()
    target = options.latency_target_ms
    levels = len(concurrency_levels(options.max_concurrency))
    batch_sweeps = len(options.batch_configs(0, 0.0))
    sweeps: list[Sweep] = []

    def left(worker_counts: int) -> int:
        return (worker_counts + batch_sweeps) * levels

    listener.remaining(left(options.max_workers + int(options.in_process)))
    if options.in_process:
        sweep = await _sweep(bench, Config(0), options, listener, left(options.max_workers))
        sweeps.append(sweep)
    for workers in range(1, options.max_workers + 1):
        sweep = await _sweep(
            bench, Config(workers), options, listener, left(options.max_workers - workers)
        )
        sweeps.append(sweep)
        if sweep.error is not None or not keep_adding_workers(sweeps, target, options.min_gain):
            break
    listener.remaining(left(0))
    base = best_unbatched(sweeps, target, options.min_gain)
    if base is not None and batch_sweeps:
        batch_time = options.batch_time
        if batch_time is None:
            batch_time = auto_batch_time(base.steps[0] if base.steps else None, target)
        configs = options.batch_configs(base.config.parallel_workers, batch_time)
        reached = 0  # the predictive sweep goes at least as far as the fixed windows did
        for index, config in enumerate(configs):
            left_after = (len(configs) - index - 1) * levels
            until = reached if config.predictive else 0
            sweep = await _sweep(bench, config, options, listener, left_after, until)
            sweeps.append(sweep)
            if sweep.steps and not config.predictive:
                reached = max(reached, sweep.steps[-1].concurrency)
    listener.remaining(0)
    if not any(s.steps for s in sweeps):
        errors = "; ".join(s.error for s in sweeps if s.error)
        raise TuneError(f"no configuration could be measured: {errors}")
    return TuneResult(sweeps, recommend(sweeps, target, options.min_gain))
