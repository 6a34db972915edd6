"""The tuning run against a simulated model of known cost: no clock, no processes.

``Simulated`` answers each load step from a closed-loop model of a server: a model call
of ``rows`` rows costs ``fixed + per_row * rows`` seconds, at most ``cores`` calls run at
once when the model is CPU-bound, a pool adds ``hop`` per call, and a batch that does
not fill waits ``max_batch_time``. The predictive batcher never waits for a batch to
fill (a worker is free, and in a closed loop nothing else is coming), and refuses
requests (errors) where the p99 would pass its SLO. Latency follows from Little's law.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio.lowlevel
import pytest

from v2mount.tuning import Config, Step, TuneError, TuneOptions, tune
from v2mount.tuning.cli import usable_cores


@dataclass
class Simulated:
    fixed: float
    per_row: float
    cores: int = 2
    cpu_bound: bool = True
    hop: float = 0.00005
    in_process_extra: float = 0.0
    fail_to_start: set[int] = field(default_factory=set)
    served: list[Config] = field(default_factory=list)

    def step(self, config: Config, concurrency: int, duration: float) -> Step:
        servers = max(config.parallel_workers, 1)
        parallel = min(servers, self.cores) if self.cpu_bound else servers
        rows, wait = 1, 0.0
        if config.batching:
            rows = max(1, min(config.max_batch_size, concurrency // servers))
            filled = rows == config.max_batch_size or config.predictive
            wait = 0.0 if filled else config.max_batch_time
        extra = self.hop if config.parallel_workers else self.in_process_extra
        call = self.fixed + self.per_row * rows + extra
        calls = min(math.ceil(concurrency / rows), parallel)
        throughput = calls * rows / (call + wait)
        latency_ms = concurrency / throughput * 1000
        refused = 0
        if config.slo_ms is not None and latency_ms * 1.5 > config.slo_ms:
            refused = concurrency // 2  # admission control: clients refused (503)
        return Step(
            concurrency,
            duration,
            round(throughput * duration),
            refused,
            latency_ms,
            latency_ms * 1.5,
            float(rows) if config.batching else None,
            "HTTP 503: predicted to miss its SLO" if refused else None,
        )

    @asynccontextmanager
    async def serve(self, config: Config) -> AsyncIterator[Simulated.Target]:
        self.served.append(config)
        if config.parallel_workers in self.fail_to_start:
            raise TuneError(f"a pool of {config.parallel_workers} would not start")
        yield Simulated.Target(self, config)

    @dataclass
    class Target:
        model: Simulated
        config: Config

        async def measure(self, concurrency: int, duration: float) -> Step:
            await anyio.lowlevel.checkpoint()
            return self.model.step(self.config, concurrency, duration)


class Recorder:
    def __init__(self) -> None:
        self.done = 0
        self.totals: list[tuple[int, int]] = []  # (steps done, steps planned) when told
        self.configs: list[Config] = []

    def started(self, config: Config) -> None:
        self.configs.append(config)

    def measured(self, config: Config, step: Step) -> None:
        self.done += 1

    def remaining(self, steps: int) -> None:
        self.totals.append((self.done, self.done + steps))


def workers_served(model: Simulated) -> list[int]:
    return [c.parallel_workers for c in model.served if not c.batching]


@pytest.mark.anyio
async def test_a_large_fixed_cost_per_call_turns_batching_on() -> None:
    model = Simulated(fixed=0.010, per_row=0.0001)
    options = TuneOptions(max_workers=2, batch_sizes=(8, 32), predictive=False)
    result = await tune(model, options)
    recommendation = result.recommendation
    assert recommendation.config.parallel_workers == 2
    assert recommendation.config.max_batch_size == 32
    # auto batch time: one request's p50 (10.05 ms) bounded by a quarter of the target
    assert recommendation.config.max_batch_time == 0.0101
    assert "so batching on" in recommendation.reason
    assert workers_served(model) == [0, 1, 2]


@pytest.mark.anyio
async def test_predictive_batching_is_measured_at_the_same_workers_and_concurrencies() -> None:
    model = Simulated(fixed=0.010, per_row=0.0001)
    result = await tune(model, TuneOptions(max_workers=2, batch_sizes=(8, 32)))
    assert [s.config for s in result.sweeps[-3:]] == [
        Config(2, 8, 0.0101),
        Config(2, 32, 0.0101),
        Config(2, 32, slo_ms=80),  # the largest size, 80 % of the latency target as SLO
    ]
    fixed, predictive = result.sweeps[-2:]
    assert [s.concurrency for s in predictive.steps] == [s.concurrency for s in fixed.steps]
    # Full batches of 32 at 64 clients cost the same either way: a tie keeps the window.
    assert result.recommendation.config == Config(2, 32, 0.0101)
    assert "The fixed window peaks higher than predictive batching (+0%)" in (
        result.recommendation.reason
    )


@pytest.mark.anyio
async def test_predictive_batching_wins_where_the_fixed_window_never_fills() -> None:
    # 16 clients never fill a batch of 32: the fixed window waits out its 10 ms every
    # time, the predictive batcher sends as soon as a worker is free.
    model = Simulated(fixed=0.010, per_row=0.0001)
    options = TuneOptions(max_workers=2, batch_sizes=(32,), max_concurrency=16, slo_ms=60)
    recommendation = (await tune(model, options)).recommendation
    assert recommendation.settings() == {
        "parallel_workers": 2,
        "max_batch_size": 32,
        "max_batch_time": 0.0,
        "batching": {"slo_ms": 60},
    }
    assert "Predictive batching peaks highest (+" in recommendation.reason
    assert 'so predictive batching on: "batching": {"slo_ms": 60}' in recommendation.reason


@pytest.mark.anyio
async def test_the_predictive_sweep_goes_as_far_as_the_fixed_window_through_a_dip() -> None:
    class Dipping(Simulated):
        """In a closed loop the predictive batcher may slow down before it speeds up."""

        def step(self, config: Config, concurrency: int, duration: float) -> Step:
            clean = super().step(config, concurrency, duration)
            if config.predictive and concurrency in (2, 4, 8):
                return Step(concurrency, duration, 10, 0, 1.0, 2.0, 1.0)
            return clean

    model = Dipping(fixed=0.010, per_row=0.0001)
    options = TuneOptions(max_workers=1, batch_sizes=(64,), max_concurrency=32)
    result = await tune(model, options)
    fixed, predictive = result.sweeps[-2:]
    assert [s.concurrency for s in predictive.steps] == [s.concurrency for s in fixed.steps]
    assert predictive.steps[-1].concurrency == 32
    assert result.recommendation.config == predictive.config  # it won at 32 clients


@pytest.mark.anyio
async def test_a_per_row_cost_keeps_batching_off_and_says_why_predictive_lost() -> None:
    model = Simulated(fixed=0.0, per_row=0.002, hop=0.0)
    options = TuneOptions(max_workers=2, latency_target_ms=30, slo_ms=10)
    result = await tune(model, options)
    recommendation = result.recommendation
    assert recommendation.settings()["max_batch_size"] == 0
    assert recommendation.settings()["batching"] is None
    assert [s.config.predictive for s in result.sweeps].count(True) == 1
    reason = recommendation.reason
    assert "Predictive batching at best (2 workers, predictive 32/SLO 10 ms) peaks at" in reason
    assert "+0% over no batching; at concurrency 8, 4 clients got an error" in reason
    assert "(HTTP 503: predicted to miss its SLO)" in reason
    assert "Batching adds less than the 10% it must, so batching off." in reason


@pytest.mark.anyio
async def test_no_predictive_sweep_without_batch_sizes_or_when_asked() -> None:
    for options in (
        TuneOptions(max_workers=1, batch_sizes=()),
        TuneOptions(max_workers=1, predictive=False),
    ):
        model = Simulated(fixed=0.010, per_row=0.0001)
        await tune(model, options)
        assert not any(config.predictive for config in model.served)


@pytest.mark.anyio
async def test_a_cpu_bound_model_on_one_core_gets_one_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    model = Simulated(fixed=0.0, per_row=0.001, cores=1, in_process_extra=0.0005)
    result = await tune(model, TuneOptions(max_workers=usable_cores()))
    assert result.recommendation.settings() == {
        "parallel_workers": 1,
        "max_batch_size": 0,
        "max_batch_time": 0.0,
        "batching": None,
    }
    assert workers_served(model) == [0, 1]  # never a second worker on one core
    assert "so batching off" in result.recommendation.reason


@pytest.mark.anyio
async def test_workers_stop_where_throughput_stops_growing() -> None:
    model = Simulated(fixed=0.0, per_row=0.001, cores=2, in_process_extra=0.0005)
    result = await tune(model, TuneOptions(max_workers=4, batch_sizes=()))
    assert result.recommendation.config == Config(2)
    assert workers_served(model) == [0, 1, 2, 3]  # 3 added nothing: 4 never started
    assert "throughput stopped growing at 3 workers (+0%" in result.recommendation.reason


@pytest.mark.anyio
async def test_a_tiny_model_stays_in_process() -> None:
    model = Simulated(fixed=0.00005, per_row=0.0, hop=0.0001)
    result = await tune(model, TuneOptions(max_workers=2, batch_sizes=(8,)))
    assert result.recommendation.config.parallel_workers == 0
    assert [c.parallel_workers for c in model.served if c.batching] == [0, 0]  # fixed, predictive


@pytest.mark.anyio
async def test_every_ramp_stops_at_the_latency_target() -> None:
    model = Simulated(fixed=0.004, per_row=0.0, cpu_bound=False)
    result = await tune(model, TuneOptions(max_workers=1, latency_target_ms=20, batch_sizes=()))
    for sweep in result.sweeps:
        assert all(step.p99_ms <= 20 for step in sweep.steps[:-1])
        assert sweep.steps[-1].p99_ms > 20 or len(sweep.steps) == 7


@pytest.mark.anyio
async def test_nothing_within_the_target_still_gives_an_answer_and_says_so() -> None:
    model = Simulated(fixed=0.050, per_row=0.0, cpu_bound=False)
    result = await tune(model, TuneOptions(max_workers=2, latency_target_ms=60))
    assert "No configuration met the 60 ms p99 target" in result.recommendation.reason
    assert result.recommendation.config == Config(0)  # lowest latency: no pool hop
    assert workers_served(model) == [0, 1]  # one worker missed the target: no second


@pytest.mark.anyio
async def test_a_pool_that_cannot_start_ends_the_walk() -> None:
    model = Simulated(fixed=0.0, per_row=0.001, fail_to_start={2})
    result = await tune(model, TuneOptions(max_workers=4, batch_sizes=()))
    assert [s.error for s in result.sweeps] == [None, None, "a pool of 2 would not start"]
    assert result.recommendation.config.parallel_workers in (0, 1)


@pytest.mark.anyio
async def test_a_model_that_cannot_run_at_all_is_an_error() -> None:
    model = Simulated(fixed=0.0, per_row=0.001, fail_to_start={0})
    with pytest.raises(TuneError, match="a pool of 0 would not start"):
        await tune(model, TuneOptions(max_workers=2))
    model = Simulated(fixed=0.0, per_row=0.001, fail_to_start={1})
    with pytest.raises(TuneError, match="no configuration could be measured"):
        await tune(model, TuneOptions(max_workers=2, in_process=False))


@pytest.mark.anyio
async def test_requests_that_all_fail_stop_the_run() -> None:
    class Failing(Simulated):
        def step(self, config: Config, concurrency: int, duration: float) -> Step:
            return Step(concurrency, duration, 0, 12, math.nan, math.nan, None, "HTTP 400: bad")

    with pytest.raises(TuneError, match="in-process: every request failed: HTTP 400: bad"):
        await tune(Failing(0.0, 0.0), TuneOptions(max_workers=1))


@pytest.mark.anyio
async def test_progress_counts_every_step_and_its_total_never_falls_below_them() -> None:
    model = Simulated(fixed=0.010, per_row=0.0001)
    recorder = Recorder()
    result = await tune(model, TuneOptions(max_workers=2), recorder)
    measured = sum(len(s.steps) for s in result.sweeps)
    assert recorder.done == measured
    assert recorder.configs == model.served
    # the plan: every configuration (in process, 2 pools, 2 windows, predictive), every step
    assert recorder.totals[0] == (0, (1 + 2 + 3) * 7)
    assert recorder.totals[-1] == (measured, measured)  # the bar ends full
    planned = [total for _, total in recorder.totals]
    assert planned == sorted(planned, reverse=True)  # the plan only shrinks as steps are skipped


@pytest.mark.anyio
async def test_repeated_steps_keep_the_median_round() -> None:
    class Noisy(Simulated):
        """Every third round of a step loses most of its throughput to a neighbour."""

        rounds = 0

        def step(self, config: Config, concurrency: int, duration: float) -> Step:
            clean = super().step(config, concurrency, duration)
            self.rounds += 1
            if self.rounds % 3:
                return clean
            return Step(concurrency, duration, clean.requests // 10, 0, 1.0, 2.0)

    noisy = Noisy(fixed=0.0, per_row=0.001)
    options = TuneOptions(max_workers=2, batch_sizes=(), repeat=3, in_process=False)
    result = await tune(noisy, options)
    assert noisy.rounds == 3 * sum(len(s.steps) for s in result.sweeps)
    clean = Simulated(fixed=0.0, per_row=0.001)
    for sweep in result.sweeps:
        for step in sweep.steps:
            assert step == clean.step(sweep.config, step.concurrency, step.duration)
