"""The batch cost fit and the arrival rate, on made-up samples (no clock, no loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from v2mount.batching._cost import CostModel
from v2mount.batching._rate import ArrivalRate

A, C = 0.004, 0.0005  # a model whose batch of b rows takes 4 ms + 0.5 ms per row


def noisy_cost(rng: np.random.Generator, rows: int, noise: float = 0.05) -> float:
    return (A + C * rows) * (1 + noise * rng.uniform(-1, 1))


def varied_rows(rng: np.random.Generator) -> int:
    """Batch sizes spread over every size class (1, 2-3, 4-7 ... 32), as load varies."""
    return int(2 ** rng.uniform(0, 5))


def test_the_fit_is_within_ten_percent_after_twenty_batches() -> None:
    within = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        model = CostModel()
        for _ in range(20):
            rows = varied_rows(rng)
            model.record(rows, noisy_cost(rng, rows))
        fit = model.fit()
        assert fit is not None and fit.samples == 20
        assert 0 <= fit.guard < 0.1 * (A + 32 * C)
        within += abs(fit.intercept / A - 1) < 0.1 and abs(fit.per_row / C - 1) < 0.1
    # With 5 % noise, a few draws of 20 batches do not pin the intercept that closely.
    assert within >= 95


def test_the_fit_shrugs_off_a_few_stalled_batches() -> None:
    rng = np.random.default_rng(5)
    model = CostModel()
    for index in range(40):
        rows = varied_rows(rng)
        stalled = index % 20 == 3  # a garbage collection, a busy core
        model.record(rows, noisy_cost(rng, rows) * (10 if stalled else 1))
    fit = model.fit()
    assert fit is not None
    assert fit.intercept == pytest.approx(A, rel=0.1)
    assert fit.per_row == pytest.approx(C, rel=0.1)


def test_the_guard_is_the_95th_percentile_of_the_noise_but_leaves_stalls_out() -> None:
    rng = np.random.default_rng(2)
    steady, stalling = CostModel(window=64), CostModel(window=64)
    for index in range(200):
        rows = varied_rows(rng)
        cost = noisy_cost(rng, rows, noise=0.1)
        steady.record(rows, cost)
        stalling.record(rows, cost + (0.2 if index % 10 == 0 else 0.0))  # 10 %: +200 ms
    calm, noisy = steady.fit(), stalling.fit()
    assert calm is not None and noisy is not None
    # 10 % noise on batches of 4.5-20 ms: the 95th percentile is a millisecond or so.
    assert 0.0003 < calm.guard < 0.002
    assert noisy.guard < 0.005  # a few ms at most: not the 200 ms of the stalls
    assert noisy.per_row == pytest.approx(C, rel=0.15)


def test_a_single_stalled_batch_of_a_rare_size_does_not_place_the_line() -> None:
    model = CostModel(min_samples=4)
    for rows in (1, 1, 1, 2, 2, 3):
        model.record(rows, A + C * rows)
    model.record(4, 100 * (A + 4 * C))  # the only batch of 4-7 rows, stalled
    model.record(1, A + C)
    fit = model.fit()
    assert fit is not None
    assert fit.per_row == pytest.approx(C)  # not the stall: 0.1 s a row


def test_it_is_cold_until_min_samples_batches_ran() -> None:
    model = CostModel(min_samples=3)
    model.record(1, 0.01)
    model.record(2, 0.02)
    assert model.fit() is None
    model.record(4, 0.03)
    first = model.fit()
    assert first is not None and first.samples == 3
    for _ in range(CostModel.REFIT - 1):
        model.record(8, 0.05)
        assert model.fit() is first  # not refitted after every batch
    model.record(8, 0.05)
    refitted = model.fit()
    assert refitted is not None and refitted.samples == 3 + CostModel.REFIT


def test_steady_full_batches_do_not_erase_what_smaller_ones_showed() -> None:
    rng = np.random.default_rng(9)
    model = CostModel(window=16)
    for rows in (1, 2, 4, 8, 16) * 4:
        model.record(rows, noisy_cost(rng, rows))
    for _ in range(500):  # hours of full batches
        model.record(32, noisy_cost(rng, 32))
    fit = model.fit()
    assert fit is not None
    assert fit.per_row == pytest.approx(C, rel=0.1)
    assert fit.intercept == pytest.approx(A, rel=0.15)


def test_one_size_only_is_taken_as_proportional_so_larger_batches_are_not_underestimated() -> None:
    model = CostModel(min_samples=4)
    for _ in range(4):
        model.record(1, A + C)
    fit = model.fit()
    assert fit is not None
    assert fit.intercept == 0.0
    assert fit.per_row == pytest.approx(A + C)
    assert fit.cost(8) >= A + 8 * C


def test_below_the_sizes_seen_the_cost_is_flat_not_the_lines_guess() -> None:
    model = CostModel()
    for rows in (16, 20, 24, 28, 32) * 4:  # steady overload: only big batches
        model.record(rows, A + C * rows)
    fit = model.fit()
    assert fit is not None and fit.min_rows >= 16
    assert fit.cost(32) == pytest.approx(A + C * 32)
    assert fit.cost(1) == fit.cost(fit.min_rows) >= A + C  # never below what was seen


def test_a_falling_cost_never_fits_a_negative_slope() -> None:
    model = CostModel(min_samples=2)
    model.record(1, 0.010)
    model.record(10, 0.005)
    fit = model.fit()
    assert fit is not None and fit.per_row == 0.0 and fit.intercept > 0


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        CostModel(window=0)


def test_the_rate_expects_nothing_before_two_arrivals() -> None:
    rate = ArrivalRate()
    assert rate.gap(0.0) == math.inf
    rate.arrive(1.0, 3)
    assert rate.gap(1.0) == math.inf
    assert rate.rows == 3


def test_the_rate_smooths_gaps_and_counts_silence() -> None:
    rate = ArrivalRate(weight=0.5)
    for step in range(20):
        rate.arrive(step * 0.01, 1)
    assert rate.gap(0.19) == pytest.approx(0.01)
    # After a silence longer than the usual gap, the next request is not expected soon.
    assert rate.gap(0.19 + 0.5) == pytest.approx(0.5)
    rate.arrive(0.2, 5)
    assert 1 < rate.rows < 5


def test_the_rate_weight_is_checked() -> None:
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        ArrivalRate(weight=0)


def test_the_rate_says_when_silence_makes_the_next_request_late() -> None:
    rate = ArrivalRate(weight=1.0)
    assert rate.last_moment(10.0) == -math.inf  # nothing expected at all
    rate.arrive(0.0, 1)
    rate.arrive(1.0, 1)  # a gap of 1 s
    assert rate.quiet_from(0.5) == -math.inf  # the gap is already 1 s
    assert rate.quiet_from(3.0) == 4.0  # after 3 s of silence
    # Waiting one gap from t must end by the limit: t + max(1, t - 1) <= limit.
    assert rate.last_moment(2.5) == 1.5
    assert rate.last_moment(9.0) == 5.0
    for limit in (2.5, 9.0):
        t = rate.last_moment(limit)
        assert t + rate.gap(t) == pytest.approx(limit)
