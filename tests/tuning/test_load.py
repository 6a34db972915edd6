"""The closed-loop generator, on a fake clock that only the requests move."""

from __future__ import annotations

import anyio.lowlevel
import pytest

from v2mount.tuning._load import run_step
from v2mount.tuning._results import summarize


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_one_client_sends_back_to_back_for_the_window() -> None:
    clock = Clock()

    async def send() -> None:
        await anyio.lowlevel.checkpoint()
        clock.now += 1.0  # every request takes one second of the fake clock

    step = await run_step(send, 1, 10.0, clock)
    assert (step.requests, step.errors, step.concurrency) == (10, 0, 1)
    assert step.throughput == 1.0
    assert (step.p50_ms, step.p99_ms) == (1000.0, 1000.0)


@pytest.mark.anyio
async def test_never_more_than_concurrency_requests_in_flight() -> None:
    clock = Clock()
    in_flight = most = calls = 0

    async def send() -> None:
        nonlocal in_flight, most, calls
        in_flight += 1
        calls += 1
        most = max(most, in_flight)
        await anyio.lowlevel.checkpoint()
        clock.now += 0.25
        in_flight -= 1

    step = await run_step(send, 3, 5.0, clock)
    assert most == 3
    assert step.errors == 0
    assert 0 < step.requests <= calls  # answers after the window count in latency only


@pytest.mark.anyio
async def test_a_client_that_fails_sends_no_more_in_the_step() -> None:
    clock = Clock()
    calls = 0

    async def send() -> None:
        nonlocal calls
        calls += 1
        clock.now += 1.0
        if calls == 4:
            raise RuntimeError(f"failure {calls}")

    step = await run_step(send, 1, 10.0, clock)
    assert (calls, step.requests, step.errors, step.error) == (4, 3, 1, "failure 4")


@pytest.mark.anyio
async def test_refusals_at_once_do_not_spin_and_the_first_text_is_kept() -> None:
    clock = Clock()
    calls = 0

    async def send() -> None:  # a 503 that never waits, as a batcher's refusal
        nonlocal calls
        calls += 1
        clock.now += 0.001
        raise RuntimeError(f"HTTP 503: refused {calls}")

    step = await run_step(send, 8, 10.0, clock)
    assert (calls, step.requests, step.errors, step.error) == (8, 0, 8, "HTTP 503: refused 1")


@pytest.mark.anyio
async def test_concurrency_must_be_positive() -> None:
    async def send() -> None:
        pass

    with pytest.raises(ValueError, match="at least 1"):
        await run_step(send, 0, 1.0)


def test_summarize_takes_nearest_rank_percentiles() -> None:
    step = summarize(4, 2.0, 100, [i / 1000 for i in range(1, 101)], errors=0)
    assert (step.p50_ms, step.p99_ms, step.throughput) == (50.0, 99.0, 50.0)
    empty = summarize(1, 1.0, 0, [], errors=3, error="boom")
    assert empty.requests == 0 and empty.errors == 3 and empty.error == "boom"
