"""Inline predicts leave the event loop turns to poll its sockets (``LoopTurns``)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from v2mount import InferenceRequest, Model, Tensor
from v2mount.errors import ModelError
from v2mount.loop_turns import LoopTurns
from v2mount.runner import InProcessRunner, _InlinePolicy

pytestmark = pytest.mark.anyio


class Busy(Model):
    """A plain predict that keeps the CPU busy ``seconds`` (wall clock) and notes its
    order of arrival."""

    name = "busy"

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.order: list[int] = []
        self.threads: list[int] = []

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        self.order.append(int(payload["x"][0]))
        self.threads.append(threading.get_ident())
        return {"y": payload["x"]}


def numbered(n: int) -> InferenceRequest:
    return InferenceRequest([Tensor("x", "INT32", (1,), np.array([n], np.int32))])


async def warm_runner(model: Busy, budget: float) -> InProcessRunner:
    runner = InProcessRunner(model, 1000, lambda updates: None, inline_budget=budget)
    await runner.start()
    for _ in range(_InlinePolicy.WARMUP):
        await runner.infer(numbered(-1))
    assert runner.inline
    model.order.clear()
    return runner


async def test_inline_predicts_leave_turns_to_the_rest_of_the_loop(anyio_backend: str) -> None:
    """32 requests in flight with 3 ms predicts and a 1 ms budget: without turns they
    would all run in one turn of the loop (another task would see 32 predicts go by
    between two of its steps); with them, at most two run per turn, on the loop, and
    every request is answered."""
    model = Busy()
    runner = await warm_runner(model, budget=0.001)
    model.seconds = 0.003
    answers: dict[int, int] = {}
    seen: list[int] = []  # predicts done, at each step of a task that only checkpoints

    async def call(n: int) -> None:
        response = await runner.infer(numbered(n))
        answers[n] = int(response.outputs[0].data[0])

    async def watch() -> None:
        while len(answers) < 32:
            seen.append(len(model.order))
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        for n in range(32):
            tg.start_soon(call, n)
    assert answers == {n: n for n in range(32)}
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= 2, steps
    assert set(model.threads[-32:]) == {threading.get_ident()}
    if anyio_backend == "asyncio":  # trio shuffles the order tasks start in
        assert model.order == list(range(32)), "first come, first served"


async def test_a_cancelled_wait_for_a_turn_holds_nobody_up() -> None:
    turns = LoopTurns(0.001)
    turns.spend(0.01)  # this turn's budget is gone: the next callers wait
    assert not turns.free
    through: list[int] = []

    async def wait(n: int, scope: anyio.CancelScope) -> None:
        with scope:
            await turns.wait()
            through.append(n)

    scopes = [anyio.CancelScope() for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for n, scope in enumerate(scopes):
            tg.start_soon(wait, n, scope)
        scopes[0].cancel()
        scopes[2].cancel()
    assert sorted(through) == [1, 3]
    await anyio.lowlevel.checkpoint()
    assert turns.free


async def test_a_request_that_waited_past_its_timeout_is_not_run() -> None:
    """``max_wait`` (the request's timeout, when the caller set no cancel scope): the
    first request takes the turn, the two behind it wait for the next one, longer than
    the 0 s they may: ``TimeoutError`` (the caller's 504), and the model never saw them."""
    model = Busy()
    runner = await warm_runner(model, budget=0.001)
    model.seconds = 0.003
    outcomes: dict[int, str] = {}

    async def call(n: int) -> None:
        try:
            await runner.infer(numbered(n), max_wait=0.0)
            outcomes[n] = "answered"
        except TimeoutError:
            outcomes[n] = "timed out"

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(call, n)
    assert sorted(outcomes.values()) == ["answered", "timed out", "timed out"]
    (answered,) = (n for n, outcome in outcomes.items() if outcome == "answered")
    assert model.order == [answered]
    assert runner.statistics().in_flight == 0


class RaisesTimeout(Model):
    """Raises ``TimeoutError`` for the request numbered 1."""

    name = "raises-timeout"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        if int(payload["x"][0]) == 1:
            raise TimeoutError("the feature store did not answer")
        return {"y": payload["x"]}


async def test_a_timeout_error_the_model_raises_is_the_models_error() -> None:
    runner = InProcessRunner(RaisesTimeout(), 10, lambda updates: None, inline_budget=1.0)
    await runner.start()
    with pytest.raises(ModelError, match="feature store"):  # in the worker thread
        await runner.infer(numbered(1), max_wait=60.0)
    for _ in range(_InlinePolicy.WARMUP):
        await runner.infer(numbered(0), max_wait=60.0)
    assert runner.inline
    with pytest.raises(ModelError, match="feature store"):  # on the loop
        await runner.infer(numbered(1), max_wait=60.0)


def test_turns_start_afresh_on_a_new_event_loop() -> None:
    """A loop that stopped with its turn's callback unrun (the budget spent, the count
    never reset) does not hold up requests on the next loop."""
    turns = LoopTurns(0.001)
    loop = asyncio.new_event_loop()

    def spend_and_stop() -> None:
        turns.spend(1.0)  # schedules the next turn's callback...
        loop.stop()  # ...which this loop will not run

    loop.call_soon(spend_and_stop)
    loop.run_forever()
    loop.close()

    async def later() -> bool:
        with anyio.fail_after(30):
            free = turns.free
            if not free:
                await turns.wait()
            return free

    assert anyio.run(later) is True
