"""The in-process runner: where a plain predict runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

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


def test_policy_leaves_the_loop_after_one_slow_inline_call() -> None:
    policy = _InlinePolicy(0.001)
    for _ in range(_InlinePolicy.WARMUP):
        policy.record(0.0001, inline=False)
    assert policy.inline
    policy.record(0.005, inline=True)  # below 10 x budget: stays
    assert policy.inline
    policy.record(0.02, inline=True)
    assert not policy.inline
    for _ in range(_InlinePolicy.WARMUP - 1):
        policy.record(0.0001, inline=False)
    assert not policy.inline  # a full warm-up again before it returns
    policy.record(0.0001, inline=False)
    assert policy.inline
