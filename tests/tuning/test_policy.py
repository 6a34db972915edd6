"""The tuning decisions, from synthetic measurements (no model, no clock)."""

from __future__ import annotations

import math

import pytest

from v2mount.tuning import Config, Step, Sweep, recommend
from v2mount.tuning._policy import (
    auto_batch_time,
    best_unbatched,
    keep_adding_workers,
    peak,
    ramp_done,
)
from v2mount.tuning._tuner import concurrency_levels


def step(concurrency: int, rate: float, p99: float = 5.0, errors: int = 0) -> Step:
    """A one-second step answering ``rate`` requests with the given p99."""
    return Step(concurrency, 1.0, int(rate), errors, p99 / 2, p99)


def sweep(workers: int, *rates: float, p99: float = 5.0, batch: int = 0) -> Sweep:
    config = Config(workers, batch, 0.002 if batch else 0.0)
    return Sweep(config, [step(2**i, rate, p99) for i, rate in enumerate(rates)])


def predictive(workers: int, *rates: float, batch: int = 32, slo_ms: float = 100) -> Sweep:
    return Sweep(
        Config(workers, batch, slo_ms=slo_ms),
        [step(2**i, rate) for i, rate in enumerate(rates)],
    )


def test_peak_is_the_fastest_step_within_the_target_without_errors() -> None:
    measured = Sweep(
        Config(1),
        [step(1, 100, 2.0), step(2, 180, 4.0), step(4, 250, 40.0), step(8, 300, 5.0, errors=1)],
    )
    assert peak(measured, target_ms=50) == measured.steps[2]
    assert peak(measured, target_ms=10) == measured.steps[1]
    assert peak(measured, target_ms=1) is None


def test_the_ramp_goes_on_while_throughput_grows() -> None:
    assert not ramp_done([], 100)
    assert not ramp_done([step(1, 100), step(2, 190), step(4, 350)], 100)


def test_the_ramp_stops_after_two_flat_steps_not_one() -> None:
    one_flat = [step(1, 100), step(2, 190), step(4, 192)]
    assert not ramp_done(one_flat, 100)
    assert ramp_done([*one_flat, step(8, 185)], 100)
    # a dip followed by a real rise is noise, not saturation
    assert not ramp_done([step(1, 100), step(2, 90), step(4, 200)], 100)


def test_before_until_only_errors_stop_the_ramp() -> None:
    dipping = [step(1, 100), step(2, 90), step(4, 95)]
    assert ramp_done(dipping, 100)
    assert not ramp_done(dipping, 100, until=8)
    assert ramp_done([*dipping, step(8, 96)], 100, until=8)  # flat still, and far enough
    late = [step(1, 100), step(2, 190, p99=120)]
    assert ramp_done(late, 100)
    assert not ramp_done(late, 100, until=4)  # a step past the target only loses the peak
    assert ramp_done([*late, step(4, 300, p99=130)], 100, until=4)
    assert ramp_done([step(1, 100), step(2, 190, errors=1)], 100, until=64)  # errors stop


def test_the_ramp_stops_at_once_past_the_target_or_on_errors() -> None:
    assert ramp_done([step(1, 100), step(2, 190, p99=120)], 100)
    assert ramp_done([step(1, 100), step(2, 190, errors=3)], 100)
    assert ramp_done([Step(1, 1.0, 0, 0, math.nan, math.nan)], 100)


def test_workers_are_added_while_each_adds_the_minimum_gain() -> None:
    one, two = sweep(1, 100, 180), sweep(2, 190, 350)
    assert keep_adding_workers([], 100, 0.1)
    assert keep_adding_workers([one], 100, 0.1)
    assert keep_adding_workers([one, two], 100, 0.1)
    three = sweep(3, 200, 360)  # +3 % over two workers
    assert not keep_adding_workers([one, two, three], 100, 0.1)
    assert best_unbatched([one, two, three], 100, 0.1) is two


def test_a_pool_that_misses_the_target_everywhere_ends_the_walk() -> None:
    one, two = sweep(1, 100, 180), sweep(2, 300, p99=500.0)
    assert not keep_adding_workers([one, two], 100, 0.1)
    assert best_unbatched([one, two], 100, 0.1) is one


def test_in_process_is_kept_when_it_peaks_at_least_as_high_as_the_pool() -> None:
    inline, one, two = sweep(0, 400, 440), sweep(1, 200, 300), sweep(2, 300, 450)
    assert best_unbatched([inline, one, two], 100, 0.1) is two
    faster = sweep(0, 400, 460)
    assert best_unbatched([faster, one, two], 100, 0.1) is faster
    recommendation = recommend([faster, one, two], 100)
    assert recommendation.settings() == {
        "parallel_workers": 0,
        "max_batch_size": 0,
        "max_batch_time": 0.0,
        "batching": None,
    }
    assert "In-process (parallel_workers 0) peaks at 460 req/s" in recommendation.reason


def test_batching_is_recommended_only_when_it_adds_the_minimum_gain() -> None:
    one, two = sweep(1, 100, 190), sweep(2, 200, 380)
    small_gain = sweep(2, 200, 400, batch=8)  # +5 %
    recommendation = recommend([one, two, small_gain], 100, min_gain=0.1)
    assert recommendation.config == Config(2)
    assert "+5% over no batching" in recommendation.reason
    assert "less than the 10% it must, so batching off" in recommendation.reason
    big_gain = sweep(2, 300, 900, batch=32)
    recommendation = recommend([one, two, small_gain, big_gain], 100, min_gain=0.1)
    assert recommendation.config == Config(2, 32, 0.002)
    assert recommendation.settings() == {
        "parallel_workers": 2,
        "max_batch_size": 32,
        "max_batch_time": 0.002,
        "batching": None,
    }
    assert "batch 32/2 ms) peaks at 900 req/s" in recommendation.reason
    assert "+137% over no batching" in recommendation.reason
    assert "at least the 10% it must, so batching on" in recommendation.reason
    assert recommendation.one_worker == one.steps[1]
    assert recommendation.peak == big_gain.steps[1]


def test_batching_at_another_worker_count_is_not_compared() -> None:
    one, two = sweep(1, 100, 190), sweep(2, 200, 380)
    elsewhere = sweep(1, 300, 900, batch=8)
    assert recommend([one, two, elsewhere], 100).config == Config(2)


def test_the_reason_tells_the_one_worker_peak_and_why_the_walk_stopped() -> None:
    reason = recommend([sweep(1, 100, 190), sweep(2, 200, 380), sweep(3, 210, 390)], 100).reason
    assert reason.startswith("One worker peaks at 190 req/s (p50 2.5 ms, p99 5.0 ms")
    assert "2 workers peak at 380 req/s" in reason
    assert "throughput stopped growing at 3 workers (+3%" in reason


def test_when_nothing_meets_the_target_the_lowest_latency_is_recommended() -> None:
    slow = [sweep(0, 10, 12, p99=300.0), sweep(1, 10, p99=250.0), sweep(2, 20, p99=260.0)]
    recommendation = recommend(slow, 100)
    assert recommendation.config == Config(1)
    assert "No configuration met the 100 ms p99 target" in recommendation.reason
    with pytest.raises(ValueError, match="no configuration was measured"):
        recommend([], 100)


def test_auto_batch_time_follows_one_request_within_bounds() -> None:
    assert auto_batch_time(step(1, 100, p99=8.0), 100) == 0.004  # p50 4 ms
    assert auto_batch_time(step(1, 100, p99=0.1), 100) == 0.001  # at least 1 ms
    assert auto_batch_time(step(1, 1, p99=400.0), 1000) == 0.05  # at most 50 ms
    assert auto_batch_time(step(1, 1, p99=400.0), 40) == 0.01  # and a quarter of the target
    assert auto_batch_time(None, 100) == 0.001


def test_concurrency_levels_double_up_to_the_maximum() -> None:
    assert concurrency_levels(1) == (1,)
    assert concurrency_levels(64) == (1, 2, 4, 8, 16, 32, 64)
    assert concurrency_levels(10) == (1, 2, 4, 8, 10)
    with pytest.raises(ValueError):
        concurrency_levels(0)


def test_config_labels_and_settings() -> None:
    assert Config(0).label == "in-process"
    assert Config(1).label == "1 worker"
    assert Config(3, 16, 0.0025).label == "3 workers, batch 16/2.5 ms"
    assert Config(2, 1, 0.5).settings() == {
        "parallel_workers": 2,
        "max_batch_size": 0,
        "max_batch_time": 0.0,
        "batching": None,
    }
    assert Config(1, 32, slo_ms=80).label == "1 worker, predictive 32/SLO 80 ms"
    assert Config(1, 32, 0.004, slo_ms=80).settings() == {
        "parallel_workers": 1,
        "max_batch_size": 32,
        "max_batch_time": 0.0,  # unused with an SLO: not written
        "batching": {"slo_ms": 80},
    }
    assert not Config(1, 0, slo_ms=80).predictive  # no batches, no batcher
    assert Config(1, 0, slo_ms=80).settings()["batching"] is None


def test_predictive_batching_is_recommended_when_it_peaks_highest() -> None:
    one = sweep(1, 100, 190)
    fixed = sweep(1, 200, 400, batch=32)
    ahead = predictive(1, 300, 600)
    recommendation = recommend([one, fixed, ahead], 100)
    assert recommendation.config == ahead.config
    assert recommendation.settings() == {
        "parallel_workers": 1,
        "max_batch_size": 32,
        "max_batch_time": 0.0,
        "batching": {"slo_ms": 100},
    }
    assert recommendation.peak == ahead.steps[1]
    reason = recommendation.reason
    assert "Predictive batching at best (1 worker, predictive 32/SLO 100 ms) peaks at 600" in reason
    assert "+216% over no batching" in reason
    assert "Predictive batching peaks highest (+50% over the fixed window)" in reason
    assert 'so predictive batching on: "batching": {"slo_ms": 100} with max_batch_size 32' in reason
    assert "Saturation: about 600 req/s" in reason


def test_the_fixed_window_wins_a_tie_and_says_by_how_much_predictive_lost() -> None:
    one, fixed = sweep(1, 100, 190), sweep(1, 200, 400, batch=32)
    for rates in ((200, 400), (200, 300)):
        recommendation = recommend([one, fixed, predictive(1, *rates)], 100)
        assert recommendation.config == fixed.config
        assert recommendation.settings()["batching"] is None
    assert "The fixed window peaks higher than predictive batching (+33%)" in (
        recommendation.reason
    )
    assert "so batching on with the fixed window" in recommendation.reason


def test_predictive_batching_alone_must_add_the_minimum_gain() -> None:
    one = sweep(1, 100, 190)
    recommendation = recommend([one, predictive(1, 100, 200)], 100, min_gain=0.1)
    assert recommendation.config == Config(1)
    assert "+5% over no batching" in recommendation.reason
    assert "so batching off" in recommendation.reason
    recommendation = recommend([one, predictive(1, 100, 250)], 100, min_gain=0.1)
    assert recommendation.config == Config(1, 32, slo_ms=100)
    assert "Predictive batching peaks highest, so predictive batching on" in (recommendation.reason)


def test_a_losing_predictive_sweep_says_where_its_ramp_ended() -> None:
    one = sweep(1, 100, 190)
    refused = predictive(1, 100, 195)
    refused.steps.append(Step(4, 1.0, 150, 37, 4.0, 9.0, 6.0, "HTTP 503: predicted late"))
    recommendation = recommend([one, refused], 100)
    assert recommendation.config == Config(1)
    assert (
        "+3% over no batching; at concurrency 4, 37 clients got an error "
        "(HTTP 503: predicted late)." in recommendation.reason
    )
    late = Sweep(Config(1, 32, slo_ms=100), [step(1, 100, p99=150.0)])
    recommendation = recommend([one, late], 100)
    assert (
        "Predictive batching (1 worker, predictive 32/SLO 100 ms) never met the 100 ms p99 "
        "target; at concurrency 1 its p99 was 150.0 ms." in recommendation.reason
    )
    assert "less than the 10% it must, so batching off" in recommendation.reason
    broken = Sweep(Config(1, 32, slo_ms=100), error="model did not start: out of memory")
    assert (
        "(1 worker, predictive 32/SLO 100 ms) never met the 100 ms p99 target; it did not "
        "start: model did not start: out of memory." in recommend([one, broken], 100).reason
    )
