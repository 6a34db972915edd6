"""The in-process runner: where a plain predict runs."""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest

from tests.support import eventually
from v2mount import InferenceRequest, Model, Tensor
from v2mount.runner import InProcessRunner, _InlinePolicy

pytestmark = pytest.mark.anyio


class WhereAmI(Model):
    name = "where"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.threads: list[int] = []

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        return {"y": payload["x"]}


def request() -> InferenceRequest:
    return InferenceRequest([Tensor("x", "INT32", (1,), np.array([1], np.int32))])


async def run(model: WhereAmI, budget: float, calls: int) -> InProcessRunner:
    runner = InProcessRunner(model, 10, lambda updates: None, inline_budget=budget)
    await runner.start()
    for _ in range(calls):
        response = await runner.infer(request())
        assert response.outputs[0].data.tolist() == [1]
    return runner


async def test_fast_predict_moves_onto_the_event_loop() -> None:
    model = WhereAmI()
    await run(model, budget=0.01, calls=_InlinePolicy.WARMUP + 5)
    loop_thread = threading.get_ident()
    assert loop_thread not in model.threads[: _InlinePolicy.WARMUP]
    assert model.threads[-5:] == [loop_thread] * 5


async def test_slow_predict_stays_in_a_thread() -> None:
    model = WhereAmI(delay=0.003)
    await run(model, budget=0.001, calls=_InlinePolicy.WARMUP + 3)
    assert threading.get_ident() not in model.threads


async def test_budget_zero_always_uses_the_thread() -> None:
    model = WhereAmI()
    await run(model, budget=0.0, calls=_InlinePolicy.WARMUP + 3)
    assert threading.get_ident() not in model.threads


def warmed(budget: float = 0.001) -> _InlinePolicy:
    policy = _InlinePolicy(budget)
    for _ in range(_InlinePolicy.WARMUP):
        policy.threaded(budget / 10)
    assert policy.inline
    return policy


def test_policy_leaves_the_loop_after_slow_inline_calls_in_a_row() -> None:
    policy = warmed()
    policy.inlined(0.005)  # slower than the budget, not ten times: no strike
    for _ in range(_InlinePolicy.STRIKES - 1):
        policy.inlined(0.02)
    assert policy.inline
    policy.inlined(0.0002)  # a fast call in between clears the strikes
    for _ in range(_InlinePolicy.STRIKES - 1):
        policy.inlined(0.02)
    assert policy.inline
    policy.inlined(0.02)
    assert not policy.inline
    # The next warm-up is twice as long.
    for _ in range(2 * _InlinePolicy.WARMUP - 1):
        policy.threaded(0.0001)
    assert not policy.inline
    policy.threaded(0.0001)
    assert policy.inline


def test_policy_leaves_the_loop_after_one_very_slow_call() -> None:
    policy = warmed()
    policy.inlined(0.5)  # a lone 500 ms call: preempted, or a GC pause; stays
    assert policy.inline
    policy.inlined(0.0002)
    policy.inlined(2.0)  # 2,000 x the budget: a model that hangs blocks the loop once
    assert not policy.inline


def test_policy_warm_up_stops_doubling() -> None:
    policy = warmed()
    for _ in range(20):
        policy.inlined(5.0)
        for _ in range(policy.warmup):
            policy.threaded(0.0001)
        assert policy.inline
    assert policy.warmup == _InlinePolicy.MAX_WARMUP


class Gated(Model):
    """Plain predict that, while ``blocking``, waits for the test to open its gate."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.blocking = False
        self.gate = threading.Semaphore(0)
        self.entered = 0
        self.threads: list[int] = []

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.entered += 1
        self.threads.append(threading.get_ident())
        if self.blocking:
            self.gate.acquire(timeout=30)
        return {"y": payload["x"]}


#: Polls state that the runner's thread or task changes.
until = partial(eventually, seconds=60.0, interval=0.002)


async def test_requests_queued_behind_a_threaded_call_run_inline_once_warm() -> None:
    """Once the policy says inline, a request that finds a threaded call still running
    waits for it and then runs on the loop: the model does not stay in the thread for
    as long as requests keep arriving."""
    model = Gated()
    runner = InProcessRunner(model, 10, lambda updates: None, inline_budget=1.0)
    await runner.start()
    for _ in range(_InlinePolicy.WARMUP - 1):
        await runner.infer(request())
    model.blocking = True
    done: list[str] = []

    async def call(label: str) -> None:
        await runner.infer(request())
        done.append(label)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "last warm-up")
        await until(lambda: model.entered == _InlinePolicy.WARMUP)
        tg.start_soon(call, "threaded")  # the policy is not inline yet: to the thread
        await until(lambda: runner.statistics().queued == 1)
        model.gate.release()
        await until(lambda: done == ["last warm-up"] and model.entered == _InlinePolicy.WARMUP + 1)
        model.blocking = False
        tg.start_soon(call, "queued")  # inline now, but the thread still has a call
        await until(lambda: runner.statistics().queued == 1)
        assert not runner.inline
        model.gate.release()
    assert sorted(done) == ["last warm-up", "queued", "threaded"]
    loop_thread = threading.get_ident()
    assert loop_thread not in model.threads[:-1]
    assert model.threads[-1] == loop_thread
    assert runner.inline
