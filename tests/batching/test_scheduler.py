"""The scheduling core on a simulated clock, serving a fake model of known cost.

``simulate`` is a discrete-event simulation of what the async batcher does: it polls the
scheduler after every arrival, finished batch and timer, and a batch of ``b`` rows takes
``a + c·b`` simulated seconds (times a little noise). No loop, no real sleep.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from v2mount.batching._cost import CostModel
from v2mount.batching._rate import ArrivalRate
from v2mount.batching._scheduler import REASONS, Dispatch, Policy, Scheduler
from v2mount.errors import Overloaded

A, C = 0.005, 0.0005  # the fake model: 5 ms + 0.5 ms per row
SIZE, WORKERS, SLO = 32, 2, 0.050
CAPACITY = WORKERS * SIZE / (A + C * SIZE)  # requests of one row per second, full batches


@dataclass
class Run:
    scheduler: Scheduler[int]
    cost: CostModel
    answered: dict[int, tuple[float, float]] = field(default_factory=dict)  # arrived, done
    refused: list[int] = field(default_factory=list)
    batches: list[Dispatch[int]] = field(default_factory=list)
    most_in_flight: int = 0

    def latencies(self, after: float = 0.0) -> np.ndarray:
        return np.array([done - t for t, done in self.answered.values() if t >= after])

    def reasons(self) -> dict[str, int]:
        return {r: sum(1 for b in self.batches if b.reason == r) for r in REASONS}


def simulate(
    policy: Policy,
    arrivals: list[tuple[float, int]],
    *,
    workers: int = WORKERS,
    noise: float = 0.05,
    seed: int = 0,
    stop_after_batches: int | None = None,
) -> Run:
    rng = np.random.default_rng(seed)
    cost = CostModel()
    scheduler = Scheduler[int](policy, cost, ArrivalRate(), lambda: workers)
    run = Run(scheduler, cost)
    order = itertools.count()
    events: list[tuple[float, int, str, object]] = [
        (t, next(order), "arrive", (index, rows)) for index, (t, rows) in enumerate(arrivals)
    ]
    heapq.heapify(events)
    timers: set[float] = set()
    finished = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, tuple)
            index, rows = payload
            try:
                scheduler.add("key", index, rows, now)
            except Overloaded:
                run.refused.append(index)
        elif kind == "done":
            assert isinstance(payload, Dispatch)
            scheduler.finished(payload, now, ok=True)
            for entry in payload.entries:
                run.answered[entry.item] = (entry.arrived, now)
            finished += 1
            if finished == stop_after_batches:
                break
        sent, wake = scheduler.poll(now)
        for dispatch in sent:
            run.batches.append(dispatch)
            took = (A + C * dispatch.rows) * (1 + noise * rng.uniform(-1, 1))
            heapq.heappush(events, (now + took, next(order), "done", dispatch))
        run.most_in_flight = max(run.most_in_flight, scheduler.in_flight)
        if wake < math.inf and wake not in timers:
            timers.add(wake)
            heapq.heappush(events, (wake, next(order), "timer", None))
    return run


def poisson(rate: float, seconds: float, seed: int = 1) -> list[tuple[float, int]]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.3) + 10))
    return [(float(t), 1) for t in times[times < seconds]]


def slo_policy(**overrides: object) -> Policy:
    settings: dict[str, object] = {"max_batch_size": SIZE, "slo": SLO, "max_queue": 100_000}
    settings.update(overrides)
    return Policy(**settings)  # type: ignore[arg-type]


def test_the_cost_fit_is_within_ten_percent_after_twenty_batches() -> None:
    within = 0
    for seed in range(20):
        arrivals = poisson(0.6 * CAPACITY, 2.0, seed=seed)
        run = simulate(slo_policy(), arrivals, seed=seed, stop_after_batches=20)
        fit = run.cost.fit()
        assert fit is not None and fit.samples == 20
        within += abs(fit.intercept / A - 1) < 0.1 and abs(fit.per_row / C - 1) < 0.1
    # 5 % noise on twenty batches whose sizes the load chose: nearly always within 10 %.
    assert within >= 18


def test_poisson_load_at_80_percent_of_capacity_keeps_p99_within_the_slo() -> None:
    arrivals = poisson(0.8 * CAPACITY, 4.0)
    run = simulate(slo_policy(), arrivals)
    assert run.refused == []
    assert len(run.answered) == len(arrivals)
    assert np.percentile(run.latencies(), 99) <= SLO
    assert run.scheduler.tally.slo_misses <= 0.01 * len(arrivals)
    assert np.mean([b.rows for b in run.batches]) > 8  # it did batch
    assert run.most_in_flight == WORKERS  # one batch per worker, never more
    assert max(b.rows for b in run.batches) <= SIZE


def test_light_load_is_not_made_to_wait_for_company() -> None:
    run = simulate(slo_policy(), poisson(0.1 * CAPACITY, 4.0))
    fit = run.cost.fit()
    assert fit is not None
    # Far below the SLO: a batch goes as soon as it is big enough for the load.
    assert np.percentile(run.latencies(), 50) < 4 * fit.cost(1)
    assert run.reasons()["idle"] == len(run.batches)


@pytest.mark.parametrize("load", [1.5, 2.0])
def test_overload_is_refused_at_once_and_the_served_p99_stays_within_the_slo(
    load: float,
) -> None:
    arrivals = poisson(load * CAPACITY, 4.0)
    run = simulate(slo_policy(), arrivals)
    assert len(run.refused) + len(run.answered) == len(arrivals)
    excess = 1 - 1 / load
    assert excess - 0.1 < len(run.refused) / len(arrivals) < excess + 0.1
    # The first batches run before the cost model is fitted: judge from the second one.
    assert np.percentile(run.latencies(after=1.0), 99) <= SLO
    assert run.reasons()["full"] > 0.9 * len(run.batches)


def warm(scheduler: Scheduler[int], cost: CostModel, rate: ArrivalRate, gap: float) -> float:
    """A fitted, exact cost model and a steady arrival every ``gap``; returns the time."""
    for rows in (1, 2, 4, 8, 16, 32) * 2:
        cost.record(rows, A + C * rows)
    now = 0.0
    for _ in range(50):
        rate.arrive(now, 1)
        now += gap
    return now


@pytest.mark.parametrize(("max_wait", "workers"), [(math.inf, 1), (0.005, 1), (0.030, 4)])
def test_a_lone_request_waits_no_longer_than_max_wait_or_the_slo_less_its_cost(
    max_wait: float, workers: int
) -> None:
    cost, rate = CostModel(), ArrivalRate()
    scheduler = Scheduler[int](slo_policy(max_wait=max_wait), cost, rate, lambda: workers)
    now = warm(scheduler, cost, rate, gap=0.0005)  # company is expected: it waits
    scheduler.add("key", 0, 1, now)
    sent, wake = scheduler.poll(now)
    assert sent == []
    bound = min(max_wait, SLO - (A + C))
    assert now < wake <= now + bound
    sent, _ = scheduler.poll(wake)  # nobody came
    assert [(b.rows, [e.item for e in b.entries]) for b in sent] == [(1, [0])]


def test_a_batch_held_for_a_busy_worker_goes_when_it_frees_as_deadline() -> None:
    cost, rate = CostModel(), ArrivalRate()
    scheduler = Scheduler[int](slo_policy(), cost, rate, lambda: 1)
    now = warm(scheduler, cost, rate, gap=0.0001)
    scheduler.add("key", 0, 1, now)
    sent, wake = scheduler.poll(now)
    assert sent == []  # company is expected
    now = wake
    first, _ = scheduler.poll(now)
    assert [b.rows for b in first] == [1]
    for index in range(1, 4):
        scheduler.add("key", index, 1, now + index * 0.0001)
    held, wake = scheduler.poll(now + 0.0004)
    assert held == [] and wake == math.inf  # no worker: nothing to time
    later = now + SLO  # the worker was stuck for the whole SLO
    scheduler.finished(first[0], later, ok=True)
    sent, _ = scheduler.poll(later)
    assert [(b.reason, b.rows) for b in sent] == [("deadline", 3)]
    assert scheduler.tally.slo_misses == 1


def test_admission_refuses_what_cannot_finish_in_time_with_retry_after() -> None:
    cost, rate = CostModel(), ArrivalRate()
    scheduler = Scheduler[int](slo_policy(max_batch_size=8), cost, rate, lambda: 1)
    now = warm(scheduler, cost, rate, gap=0.0001)
    admitted = 0
    with pytest.raises(Overloaded) as refused:
        for index in range(100):
            scheduler.add("key", index, 1, now)
            admitted += 1
    # A full batch of 8 costs 9 ms: five of them (40 rows) end within 50 ms, not six.
    assert 32 <= admitted <= 48
    assert refused.value.status_code == 503
    assert refused.value.headers() == {"Retry-After": "1"}
    assert "50 ms latency target" in refused.value.message
    assert scheduler.tally.refused == 1
    assert scheduler.queued_requests == admitted


def test_without_admission_only_the_queue_bound_refuses() -> None:
    cost, rate = CostModel(), ArrivalRate()
    policy = slo_policy(admission=False, max_queue=10)
    scheduler = Scheduler[int](policy, cost, rate, lambda: 1)
    now = warm(scheduler, cost, rate, gap=0.0001)
    for index in range(10):
        scheduler.add("key", index, 1, now)
    with pytest.raises(Overloaded, match="10 requests are waiting to be batched"):
        scheduler.add("key", 10, 1, now)


def test_a_batch_never_grows_past_what_can_meet_the_slo() -> None:
    cost, rate = CostModel(), ArrivalRate()
    policy = slo_policy(max_batch_size=1000, admission=False)
    scheduler = Scheduler[int](policy, cost, rate, lambda: 1)
    now = warm(scheduler, cost, rate, gap=0.0001)
    for index in range(300):
        scheduler.add("key", index, 1, now)
    sent, _ = scheduler.poll(now)
    # 5 ms + 0.5 ms per row within 50 ms: at most 90 rows.
    assert [(b.reason, b.rows) for b in sent] == [("full", 90)]


def test_cold_batches_go_at_once_when_a_worker_is_free() -> None:
    scheduler = Scheduler[int](slo_policy(), CostModel(), ArrivalRate(), lambda: 2)
    for index in range(3):
        scheduler.add("key", index, 1, 0.001 * index)
        sent, wake = scheduler.poll(0.001 * index)
        if index < 2:
            assert [b.reason for b in sent] == ["idle"] and wake == math.inf
        else:
            assert sent == []  # both workers busy: it waits for one, not for a timer
    assert scheduler.queued_requests == 1


def test_keys_never_mix_and_the_oldest_queue_goes_first() -> None:
    scheduler = Scheduler[int](slo_policy(), CostModel(), ArrivalRate(), lambda: 1)
    scheduler.add("a", 0, 1, 0.0)
    (busy,), _ = scheduler.poll(0.0)
    scheduler.add("b", 1, 2, 0.001)
    scheduler.add("a", 2, 3, 0.002)
    scheduler.add("b", 3, 1, 0.003)
    scheduler.finished(busy, 0.004, ok=True)
    (first,), _ = scheduler.poll(0.004)
    assert [e.item for e in first.entries] == [1, 3] and first.rows == 3


def test_a_cancelled_request_leaves_its_queue() -> None:
    scheduler = Scheduler[int](slo_policy(), CostModel(), ArrivalRate(), lambda: 0)
    kept = scheduler.add("key", 0, 2, 0.0)
    gone = scheduler.add("key", 1, 3, 0.0)
    assert scheduler.remove(gone) is True
    assert scheduler.remove(gone) is False
    assert (scheduler.queued_requests, scheduler.queued_rows) == (1, 2)
    assert scheduler.remove(kept) is True
    assert scheduler.idle


def fixed_policy(idle_dispatch: bool) -> Policy:
    return Policy(max_batch_size=SIZE, max_wait=0.004, idle_dispatch=idle_dispatch)


def test_the_fixed_window_with_idle_dispatch_sends_a_lone_request_at_once() -> None:
    arrivals = poisson(20, 4.0)  # a request every 50 ms: nothing else comes in 4 ms
    eager = simulate(fixed_policy(idle_dispatch=True), arrivals)
    patient = simulate(fixed_policy(idle_dispatch=False), arrivals)
    assert eager.reasons()["idle"] >= 0.95 * len(eager.batches)
    assert patient.reasons()["deadline"] == len(patient.batches)
    assert np.percentile(eager.latencies(), 50) < np.percentile(patient.latencies(), 50)
    assert all(b.sent - b.entries[0].arrived == 0 for b in eager.batches if b.reason == "idle")


def test_the_fixed_window_under_load_still_waits_for_company() -> None:
    run = simulate(fixed_policy(idle_dispatch=True), poisson(0.5 * CAPACITY, 2.0))
    assert np.mean([b.rows for b in run.batches]) > 4
    # Most heads waited well into the 4 ms window, not sent the moment a worker was free.
    assert np.median([b.sent - b.entries[0].arrived for b in run.batches]) > 0.002


def test_policies_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, not 0"):
        Policy(max_batch_size=0)
    with pytest.raises(ValueError, match="slo must be positive, not 0"):
        Policy(max_batch_size=2, slo=0)
    with pytest.raises(ValueError, match="max_wait must not be negative"):
        Policy(max_batch_size=2, max_wait=-1)
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        Policy(max_batch_size=2, max_queue=0)
