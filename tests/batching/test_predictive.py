"""``PredictiveBatcher`` on real event loops (asyncio and trio), and on trio's virtual clock.

Timing decisions are steered by a ``FakeClock`` that the fake runner moves forward by
the cost of each batch (``a + c·b``, seconds long where it matters), so what the batcher
decides does not depend on how loaded the machine is; the tests assert what happened,
never how long it took.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import eventually, infer_all
from v2mount.batching import Policy, PredictiveBatcher
from v2mount.errors import ModelError, Overloaded
from v2mount.runner import RunnerStatistics
from v2mount.stats import mark_started, started_at
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

pytestmark = pytest.mark.anyio


class FakeClock:
    """Seconds the fake runner says its batches took; plus real time if ``real``.

    A frozen clock (``real=False``) makes fits exact, but then no timer of the batcher
    ever comes due: use it where nothing waits for company (cold, or ``max_wait=0``).
    """

    def __init__(self, real: bool = False) -> None:
        self.offset = 0.0
        self.real = real

    def __call__(self) -> float:
        return (time.monotonic() if self.real else 0.0) + self.offset


class CostRunner:
    """A runner whose batch of ``b`` rows costs ``a + c·b`` — on ``clock``, or slept.

    With ``sleep`` the cost is slept (use with trio's virtual clock); otherwise it is
    added to ``clock`` when the batch is answered. ``gate`` set: each call first waits
    for it. Records the rows of every call and the most calls at once.
    """

    ready = True
    reason = None

    def __init__(
        self,
        a: float,
        c: float,
        workers: int = 1,
        clock: FakeClock | None = None,
        sleep: bool = False,
    ) -> None:
        self.a, self.c, self.workers, self.clock, self.sleep = a, c, workers, clock, sleep
        self.calls: list[int] = []
        self.running = 0
        self.most_running = 0
        self.gate: anyio.Event | None = None
        self.entered = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        x = request.inputs[0].data
        self.calls.append(x.shape[0])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.entered += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            cost = self.a + self.c * x.shape[0]
            if self.sleep:
                await anyio.sleep(cost)
            elif self.clock is not None:
                self.clock.offset += cost
        finally:
            self.running -= 1
        if request.parameters.get("fail"):
            raise ModelError("ValueError: boom")
        y = x * 2
        return InferenceResponse("m", [Tensor("y", "FP64", y.shape, y)], None, request.id)

    def statistics(self) -> RunnerStatistics:
        return RunnerStatistics(self.workers, self.workers, 0, self.running, 10**6)


def request(values: Any, id: str | None = None, **parameters: Any) -> InferenceRequest:
    x = np.asarray(values, dtype=np.float64)
    return InferenceRequest([Tensor("x", "FP64", x.shape, x)], id, parameters)


def y_of(response: object) -> list[Any]:
    assert isinstance(response, InferenceResponse), response
    return response.outputs[0].data.tolist()  # type: ignore[no-any-return]


#: Waits for a state of the batcher or model that no event announces (it may last only
#: milliseconds, so it is polled often).
until = partial(eventually, seconds=10.0, interval=0.001)


async def test_requests_that_find_the_worker_busy_go_together_when_it_frees() -> None:
    clock = FakeClock()
    runner = CostRunner(0.01, 0.001, clock=clock)
    runner.gate = anyio.Event()
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=8, slo=1.0), clock=clock)
    results: dict[str, object] = {}

    async def send(name: str, values: Any) -> None:
        results[name] = await batcher.infer(request(values, id=name))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(send, "first", [[1]])
            await until(lambda: runner.entered == 1)  # cold: it went at once
            for index in range(2, 5):
                group.start_soon(send, f"r{index}", [[index], [index]])
            await until(lambda: batcher.statistics().queued_requests == 3)
            assert runner.calls == [1]  # one batch in flight per worker: they wait
            runner.gate.set()
    assert runner.calls == [1, 6]
    assert runner.most_running == 1
    assert y_of(results["first"]) == [[2]]
    assert [y_of(results[f"r{i}"]) for i in range(2, 5)] == [[[4], [4]], [[6], [6]], [[8], [8]]]
    assert [getattr(results[f"r{i}"], "id", None) for i in range(2, 5)] == ["r2", "r3", "r4"]
    stats = batcher.statistics()
    assert (stats.batches, stats.batched_requests, stats.dispatched_idle) == (2, 4, 2)
    assert (stats.queued_requests, stats.in_flight_batches) == (0, 0)


def slow_model(admission: bool) -> tuple[CostRunner, PredictiveBatcher]:
    """10 s + 1 s per row, an SLO of 20 s, and nothing waits for company."""
    clock = FakeClock()
    runner = CostRunner(10, 1, clock=clock)
    policy = Policy(max_batch_size=32, slo=20, max_wait=0, admission=admission)
    return runner, PredictiveBatcher(runner, policy, clock=clock, min_samples=2)


async def test_a_request_predicted_to_miss_its_slo_is_refused_at_once() -> None:
    runner, batcher = slow_model(admission=True)
    await batcher.infer(request([[1]]))
    await batcher.infer(request([[1], [2]]))  # the fit: 10 s + 1 s per row
    assert (batcher.statistics().intercept, batcher.statistics().per_row) == (10, 1)
    runner.gate = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.infer, request([[3]]))
            await until(lambda: runner.entered == 3)
            # It would start when the batch in flight ends (in 11 s) and take 12 s more
            # (itself and about one more row): 3 s past its 20 s. Refused, not queued.
            with pytest.raises(Overloaded) as refused:
                await batcher.infer(request([[4]]))
            runner.gate.set()
    assert refused.value.headers() == {"Retry-After": "4"}
    assert refused.value.message == (
        "a request now would be answered about 3119 ms after its 20000 ms latency target"
    )
    stats = batcher.statistics()
    assert (stats.refused, stats.batches, stats.queued_requests) == (1, 3, 0)
    assert runner.calls == [1, 2, 1]


async def test_without_admission_the_same_request_waits_and_is_answered() -> None:
    runner, batcher = slow_model(admission=False)
    await batcher.infer(request([[1]]))
    await batcher.infer(request([[1], [2]]))
    runner.gate = anyio.Event()
    answers: list[object] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.infer, request([[3]]))
            await until(lambda: runner.entered == 3)

            async def late() -> None:
                answers.append(await batcher.infer(request([[4]])))

            group.start_soon(late)
            await until(lambda: batcher.statistics().queued_requests == 1)
            runner.gate.set()
    assert [y_of(answer) for answer in answers] == [[[8]]]
    stats = batcher.statistics()
    # Two cold batches went as idle; then max_wait = 0 sends each batch at its deadline.
    assert (stats.refused, stats.batches, stats.dispatched_idle) == (0, 4, 2)
    # Admission was right: answered 22 s after it came, past its 20 s.
    assert (stats.dispatched_deadline, stats.slo_misses) == (2, 1)


async def test_a_request_waits_for_expected_company_and_goes_when_the_batch_fills() -> None:
    clock = FakeClock()
    runner = CostRunner(10, 1, clock=clock)  # a request every 11-12 s, so far
    batcher = PredictiveBatcher(
        runner, Policy(max_batch_size=2, slo=100), clock=clock, min_samples=2
    )
    await batcher.infer(request([[1]]))
    await batcher.infer(request([[2]]))
    answers: list[object] = []

    async def send(value: int) -> None:
        answers.append(await batcher.infer(request([[value]])))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(send, 3)
            await until(lambda: batcher.statistics().queued_requests == 1)
            # The worker is free, but a batch of one would not keep up with the rate the
            # requests came at: it waits (its timer is many seconds away) ...
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert runner.calls == [1, 1]
            group.start_soon(send, 4)  # ... until the next one fills it.
    assert runner.calls == [1, 1, 2]
    assert sorted(y_of(answer) for answer in answers) == [[[6]], [[8]]]
    stats = batcher.statistics()
    assert (stats.dispatched_full, stats.queued_requests, stats.in_flight_batches) == (1, 0, 0)


async def test_a_request_cancelled_while_queued_leaves_and_the_rest_are_answered() -> None:
    clock = FakeClock()
    runner = CostRunner(0.01, 0.001, clock=clock)
    runner.gate = anyio.Event()
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=8, slo=1.0), clock=clock)
    answers: dict[str, object] = {}

    async def send(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            answers[name] = await batcher.infer(request([[len(answers) + 1]], id=name))

    doomed = anyio.CancelScope()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(send, "busy")
            await until(lambda: runner.entered == 1)
            group.start_soon(send, "doomed", doomed)
            group.start_soon(send, "kept")
            await until(lambda: batcher.statistics().queued_requests == 2)
            doomed.cancel()
            await until(lambda: batcher.statistics().queued_requests == 1)
            runner.gate.set()
    assert sorted(answers) == ["busy", "kept"]
    assert runner.calls == [1, 1]
    assert batcher.statistics().queued_rows == 0


async def test_errors_reach_every_member_of_the_batch_each_as_its_own_copy() -> None:
    clock = FakeClock()
    runner = CostRunner(0.01, 0.001, clock=clock)
    runner.gate = anyio.Event()
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=8, slo=1.0), clock=clock)
    results: list[object] = []

    async def send(values: Any) -> None:
        try:
            results.append(await batcher.infer(request(values, fail=True)))
        except ModelError as exc:
            results.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(send, [[1]])
            await until(lambda: runner.entered == 1)
            group.start_soon(send, [[2]])
            group.start_soon(send, [[3]])
            await until(lambda: batcher.statistics().queued_requests == 2)
            runner.gate.set()
    assert runner.calls == [1, 2]
    assert [getattr(r, "message", None) for r in results] == ["ValueError: boom"] * 3
    assert results[1] is not results[2]
    stats = batcher.statistics()
    assert (stats.in_flight_batches, stats.batches, stats.cost_samples) == (0, 2, 0)


async def test_unbatchable_requests_go_straight_to_the_runner() -> None:
    clock = FakeClock()
    runner = CostRunner(0.01, 0.001, clock=clock)
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=2, slo=1.0), clock=clock)
    big = await batcher.infer(request([[1], [2], [3]]))
    assert y_of(big) == [[2], [4], [6]]
    assert batcher.statistics().unbatched_requests == 1


async def test_a_fixed_window_with_idle_dispatch_sends_a_lone_request_at_once() -> None:
    clock = FakeClock()
    runner = CostRunner(5, 0.1, clock=clock)  # a request every 5 s, a window of 1 s
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=8, max_wait=1.0), clock=clock)
    with anyio.fail_after(10):
        for value in range(3):
            assert y_of(await batcher.infer(request([[value]]))) == [[2 * value]]
    stats = batcher.statistics()
    assert (stats.batches, stats.dispatched_idle, stats.slo) == (3, 3, None)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_successive_requests_may_come_from_different_event_loops(backend: str) -> None:
    clock = FakeClock()
    runner = CostRunner(0.01, 0.001, clock=clock)
    batcher = PredictiveBatcher(runner, Policy(max_batch_size=4, slo=1.0), clock=clock)
    for value in range(3):
        answer = anyio.run(batcher.infer, request([[value]]), backend=backend)
        assert y_of(answer) == [[2 * value]]
    assert batcher.statistics().batches == 3


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    max_batch_size=st.integers(2, 6),
    slo=st.sampled_from([None, 0.05, 1.0]),
)
async def test_batched_answers_equal_unbatched_answers(
    sizes: list[int], max_batch_size: int, slo: float | None
) -> None:
    clock = FakeClock(real=True)
    runner = CostRunner(0.001, 0.0001, workers=2, clock=clock)
    policy = Policy(max_batch_size=max_batch_size, slo=slo, max_wait=0.002)
    batcher = PredictiveBatcher(runner, policy, clock=clock, min_samples=2)
    requests = [
        request(np.arange(rows)[:, None] + 10 * index, id=str(index))
        for index, rows in enumerate(sizes)
    ]
    answers = await infer_all(batcher, requests)
    for sent, answer in zip(requests, answers, strict=True):
        if isinstance(answer, Overloaded):  # refused at once is an answer too
            continue
        expected = await runner.infer(sent)
        assert isinstance(answer, InferenceResponse), answer
        assert answer.id == sent.id
        np.testing.assert_array_equal(answer.outputs[0].data, expected.outputs[0].data)
    assert runner.most_running <= 2
    assert batcher.statistics().queued_requests == 0


def test_poisson_load_on_trios_virtual_clock_keeps_p99_within_the_slo() -> None:
    """The whole batcher — tasks, timers, cancel scopes — in virtual time."""
    a, c, size, workers, slo = 0.005, 0.0005, 32, 2, 0.050
    capacity = workers * size / (a + c * size)
    latencies: list[float] = []
    refused: list[float] = []

    async def main() -> PredictiveBatcher:
        runner = CostRunner(a, c, workers=workers, sleep=True)
        policy = Policy(max_batch_size=size, slo=slo)
        batcher = PredictiveBatcher(runner, policy, clock=anyio.current_time)
        rng = np.random.default_rng(11)

        async def one(row: int) -> None:
            started = anyio.current_time()
            try:
                answer = await batcher.infer(request([[row]]))
            except Overloaded:
                refused.append(started)
                return
            assert y_of(answer) == [[2 * row]]
            latencies.append(anyio.current_time() - started)

        async with anyio.create_task_group() as group:
            for row in range(int(0.8 * capacity * 1.5)):  # 1.5 s of traffic
                group.start_soon(one, row)
                await anyio.sleep(float(rng.exponential(1 / (0.8 * capacity))))
        assert runner.most_running <= workers
        return batcher

    batcher = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    stats = batcher.statistics()
    assert refused == []
    assert np.percentile(latencies, 99) <= slo
    assert stats.intercept == pytest.approx(a, rel=0.1)
    assert stats.per_row == pytest.approx(c, rel=0.1)
    assert stats.batched_requests == len(latencies)
    assert stats.batched_requests / stats.batches > 8
    assert not math.isnan(stats.guard or 0.0)


class SharedWorkerRunner(CostRunner):
    """A pool whose one worker also runs calls the batcher does not see (a model's
    stages): each batch first waits ``queue`` seconds for it, and says when the worker
    took it up, as ``WorkerPool`` does."""

    queue = 100.0

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        assert self.clock is not None
        sent = started_at() or time.perf_counter_ns()  # the batcher marks it
        self.clock.offset += self.queue
        mark_started(sent + int(self.queue * 1e9))
        return await super().infer(request)


async def test_a_batch_waiting_for_a_busy_worker_is_not_counted_as_its_cost() -> None:
    clock = FakeClock()
    runner = SharedWorkerRunner(10, 1, clock=clock)
    policy = Policy(max_batch_size=32, slo=150, max_wait=0)
    batcher = PredictiveBatcher(runner, policy, clock=clock, min_samples=2)
    await batcher.infer(request([[1]]))
    await batcher.infer(request([[1], [2]]))
    stats = batcher.statistics()
    assert (stats.intercept, stats.per_row) == (10, 1)  # not 110 s: the wait is left out
    runner.gate = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.infer, request([[3]]))
            await until(lambda: runner.entered == 3)
            # Predicted at about 23 s (a cost of 110 s would say 232 s, past the SLO):
            # it waits, and is answered.
            group.start_soon(batcher.infer, request([[4]]))
            await until(lambda: batcher.statistics().queued_requests == 1)
            runner.gate.set()
    stats = batcher.statistics()
    assert (stats.refused, stats.batches, stats.queued_requests) == (0, 4, 0)
    assert runner.calls == [1, 2, 1, 1]
