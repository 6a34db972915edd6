"""A closed-loop load generator: N client tasks, each sending again on each answer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

from v2mount.tuning._results import Step, summarize

__all__ = ["Send", "run_step"]

#: One request; returns on success, raises (any exception) on failure.
Send = Callable[[], Awaitable[None]]


async def run_step(
    send: Send,
    concurrency: int,
    duration: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Step:
    """Keep ``concurrency`` requests in flight for ``duration`` seconds of ``clock``.

    No client starts a request after the window closes; those in flight then are
    awaited (their latency counts, their answer does not count toward throughput), so
    nothing of one step leaks into the next. A client whose request fails sends no more
    in this step: one failure already disqualifies the step, and a client retrying at
    once would spin (a batcher refusing requests with 503 answers in microseconds),
    taking the CPU from the server it measures. So ``errors`` counts the clients that
    failed; the first failure's text is kept. Cancelling it cancels every client and
    their requests in flight.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    latencies: list[float] = []
    in_window = errors = 0
    first_error: str | None = None
    end = clock() + duration

    async def client() -> None:
        nonlocal in_window, errors, first_error
        while True:
            started = clock()
            if started >= end:
                return
            try:
                await send()
            except Exception as exc:
                errors += 1
                if first_error is None:
                    first_error = str(exc) or type(exc).__name__
                return
            finished = clock()
            latencies.append(finished - started)
            if finished <= end:
                in_window += 1

    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(client)
    return summarize(concurrency, duration, in_window, latencies, errors, first_error)
