"""What a worker pool costs and buys: ``WorkerPool.infer`` against ``InProcessRunner.infer``.

No HTTP: each figure times the runner call alone, so it shows the pool's own cost.

- ``latency``: sequential calls with a tiny model (one FP32[4] input returned as is);
  p50 / p99 of one call in-process and through a one-worker pool, and the difference.
- ``cpu``: CPU per call of the same sequential calls: in-process, and through a
  one-worker pool in the parent (every thread: the caller's loop and the supervisor)
  and in the worker, separately (the worker's includes the predict, which moved there).
- ``4 MB``: one FP32[1048576] identity round trip through a one-worker pool, through
  shared memory and (threshold raised above the tensor) through the pipe alone.
  MB/s counts the tensor's 4 MiB once per round trip; the CPU per call of the parent
  and of the worker follows.
- ``scaling``: a CPU-bound predict (about 10 ms of single-threaded numpy), 8 concurrent
  callers, throughput with 1 and with 2 workers (and the CPU the workers got).
- ``wake-up``: how long a plain thread takes to wake a task waiting on an event loop,
  non-blocking (``run_sync_soon``, what the pool uses) or blocking
  (``anyio.from_thread.run_sync``), for the record.

Run from the repository root (the workers are spawned, so the models defined here
travel to them by value):

    python -m benchmarks.pool_overhead                 # asyncio
    python -m benchmarks.pool_overhead --backend trio
    python -m benchmarks.pool_overhead --quick         # fewer calls
    python -m benchmarks.pool_overhead --only scaling  # one figure

On a shared machine other processes take cores from the workers: ``scaling`` prints
the cores the workers actually got next to their throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.from_thread
import numpy as np
from anyio.lowlevel import EventLoopToken, current_token

from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.runner import InProcessRunner, Runner
from v2mount.types import InferenceRequest, Tensor


class Identity(Model):
    name = "identity"

    def predict(self, payload: InferenceRequest) -> Any:
        return {t.name: t.data for t in payload.inputs}


class Burn(Model):
    """About 10 ms of single-threaded numpy work per call (run with one BLAS thread)."""

    name = "burn"

    def load(self) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.random((160, 160))

    def predict(self, payload: InferenceRequest) -> Any:
        x = self.a
        for _ in range(int(payload["rounds"][0])):
            x = np.tanh(x @ self.a) / 160
        return {"y": np.array([x.sum()])}


def ignore(updates: list[MetricUpdate]) -> None:
    """The metrics sink: these models record none."""


def fp32(n: int) -> InferenceRequest:
    data = np.random.default_rng(1).random(n, dtype=np.float32)
    return InferenceRequest([Tensor("x", "FP32", (n,), data)])


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = np.array(samples) * 1e3
    return float(np.percentile(ordered, 50)), float(np.percentile(ordered, 99))


async def timed_calls(runner: Runner, request: InferenceRequest, calls: int) -> list[float]:
    for _ in range(min(50, calls)):  # warm up: threads, arena pages, caches
        await runner.infer(request)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await runner.infer(request)
        samples.append(time.perf_counter() - start)
    return samples


async def pool_of(model: Model, workers: int, **options: Any) -> WorkerPool:
    config = PoolConfig(workers, 1024, **options)
    pool = WorkerPool(model, config, metrics_sink=ignore)
    await pool.start()
    return pool


async def latency(calls: int) -> None:
    request = fp32(4)
    inproc = InProcessRunner(Identity(), 1024, ignore)
    await inproc.start()
    base = percentiles(await timed_calls(inproc, request, calls))
    pool = await pool_of(Identity(), 1)
    try:
        through = percentiles(await timed_calls(pool, request, calls))
    finally:
        await pool.stop()
    print(f"tiny model, {calls} sequential calls (ms)      p50      p99")
    print(f"  InProcessRunner.infer                    {base[0]:7.3f}  {base[1]:7.3f}")
    print(f"  WorkerPool.infer (1 worker)              {through[0]:7.3f}  {through[1]:7.3f}")
    print(
        f"  added by the pool                        {through[0] - base[0]:7.3f}  "
        f"{through[1] - base[1]:7.3f}"
    )


async def cpu_per_call(runner: Runner, request: InferenceRequest, calls: int) -> float:
    """CPU seconds this process spends per sequential call (all its threads)."""
    start = time.process_time()
    for _ in range(calls):
        await runner.infer(request)
    return (time.process_time() - start) / calls


async def cpu(calls: int) -> None:
    request = fp32(4)
    inproc = InProcessRunner(Identity(), 1024, ignore)
    await inproc.start()
    await timed_calls(inproc, request, 50)
    alone = await cpu_per_call(inproc, request, calls)
    pool = await pool_of(Identity(), 1)
    try:
        await timed_calls(pool, request, 50)
        worker_before = cpu_seconds(pool.pids())
        parent = await cpu_per_call(pool, request, calls)
        worker = (cpu_seconds(pool.pids()) - worker_before) / calls
    finally:
        await pool.stop()
    print(f"tiny model, CPU per call over {calls} sequential calls (us)")
    print(f"  InProcessRunner.infer, in-process        {alone * 1e6:7.1f}")
    print(f"  WorkerPool.infer (1 worker), parent      {parent * 1e6:7.1f}")
    print(f"  WorkerPool.infer (1 worker), worker      {worker * 1e6:7.1f}")
    print(f"  added by the pool, both sides            {(parent + worker - alone) * 1e6:7.1f}")


async def big_tensor(calls: int) -> None:
    """p50 and p99 of a round trip, and the CPU it costs each side (which, unlike the
    wall time, does not grow while other processes keep the cores busy)."""
    request = fp32(1 << 20)
    mebibytes = request.inputs[0].data.nbytes / (1 << 20)
    print(
        f"4 MiB FP32 identity round trip, {calls} calls     p50 ms  p99 ms    MB/s"
        "   CPU ms: parent  worker"
    )
    for label, threshold in (("shared memory", 64 * 1024), ("pipe only", 1 << 62)):
        pool = await pool_of(Identity(), 1, shm_threshold=threshold)
        try:
            p50, p99 = percentiles(await timed_calls(pool, request, calls))
            worker_before = cpu_seconds(pool.pids())
            parent = await cpu_per_call(pool, request, calls)
            worker = (cpu_seconds(pool.pids()) - worker_before) / calls
        finally:
            await pool.stop()
        print(
            f"  {label:<40} {p50:7.2f} {p99:7.2f} {mebibytes / p50 * 1e3:7.0f}"
            f"           {parent * 1e3:6.2f}  {worker * 1e3:6.2f}"
        )


async def closed_loop(pool: WorkerPool, request: InferenceRequest, calls: int) -> float:
    """Requests per second that 8 concurrent callers get, ``calls`` in all."""
    done = 0

    async def caller() -> None:
        nonlocal done
        while done < calls:
            done += 1
            await pool.infer(request)

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(caller)
    return calls / (time.perf_counter() - start)


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes ``pids`` used so far (Linux ``/proc``; NaN elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def scaling(calls: int, rounds: int) -> None:
    """Throughput with 1 and 2 workers, and how many cores the workers got meanwhile."""
    request = InferenceRequest([Tensor("rounds", "INT64", (1,), np.array([rounds]))])
    throughput, cores = {}, {}
    one_call = 0.0
    for workers in (1, 2):
        pool = await pool_of(Burn(), workers, threads_per_worker=1)
        try:
            if workers == 1:
                one_call = percentiles(await timed_calls(pool, request, 20))[0]
            await timed_calls(pool, request, 4)
            pids = pool.pids()
            cpu, start = cpu_seconds(pids), time.perf_counter()
            throughput[workers] = await closed_loop(pool, request, calls)
            cores[workers] = (cpu_seconds(pids) - cpu) / (time.perf_counter() - start)
        finally:
            await pool.stop()
    print(f"CPU-bound predict ({one_call:.1f} ms a call, alone), 8 callers, {calls} calls")
    for workers, rate in throughput.items():
        got = cores[workers]
        print(f"  {workers} worker(s)  {rate:7.1f} req/s; the workers got {got:4.2f} cores")
    print(f"  ratio 2 / 1   {throughput[2] / throughput[1]:7.2f}")


Wake = Callable[[anyio.Event, EventLoopToken], None]


def _blocking(event: anyio.Event, token: EventLoopToken) -> None:
    anyio.from_thread.run_sync(event.set, token=token)


def _soon(event: anyio.Event, token: EventLoopToken) -> None:
    token.backend_class.run_sync_soon(event.set, (), token.native_token)


async def wake_latency(wake: Wake, calls: int) -> list[float]:
    """A plain thread wakes a waiting task ``calls`` times; seconds per wake-up."""
    token = current_token()
    armed = threading.Event()
    pending: list[tuple[anyio.Event, float]] = []

    def thread() -> None:
        for _ in range(calls):
            armed.wait()
            armed.clear()
            event = pending[-1][0]
            pending[-1] = (event, time.perf_counter())
            wake(event, token)

    waker = threading.Thread(target=thread)
    waker.start()
    samples = []
    for _ in range(calls):
        event = anyio.Event()
        pending.append((event, 0.0))
        armed.set()
        await event.wait()
        samples.append(time.perf_counter() - pending[-1][1])
    waker.join()
    return samples


async def wake_ups(calls: int) -> None:
    print(f"thread -> task wake-up, {calls} times          p50 us  p99 us")
    for label, wake in (
        ("run_sync_soon (non-blocking)", _soon),
        ("from_thread.run_sync (blocking)", _blocking),
    ):
        p50, p99 = percentiles(await wake_latency(wake, calls))
        print(f"  {label:<40} {p50 * 1e3:7.1f} {p99 * 1e3:7.1f}")


async def main(quick: bool, only: str | None) -> None:
    scale = 4 if quick else 1
    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "latency": lambda: latency(2000 // scale),
        "cpu": lambda: cpu(8000 // scale),
        "4mb": lambda: big_tensor(200 // scale),
        "scaling": lambda: scaling(400 // scale, rounds=36),
        "wake": lambda: wake_ups(2000 // scale),
    }
    for name, step in steps.items():
        if only in (None, name):
            await step()
            print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--uvloop", action="store_true", help="asyncio with uvloop")
    parser.add_argument("--quick", action="store_true", help="a quarter of the calls")
    parser.add_argument("--only", choices=["latency", "cpu", "4mb", "scaling", "wake"])
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {args.backend}, uvloop={args.uvloop}\n")
    options = {"use_uvloop": True} if args.uvloop else {}
    anyio.run(main, args.quick, args.only, backend=args.backend, backend_options=options)
