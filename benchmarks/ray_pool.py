"""The Ray pool against the process pool and against plain Ray actor calls, on one host.

No HTTP: each figure times the runner call alone (``RayPool.infer``,
``WorkerPool.infer``), so it shows what the backend itself costs.

- ``hop``: sequential calls of a tiny model (FP32[4] returned as is): p50 / p99 of one
  call in-process, through a one-worker process pool and through a one-actor Ray pool.
- ``iris``: scikit-learn LogisticRegression on iris, one row per request, 2 workers,
  concurrency 1 / 16 / 64: calls/s and the caller process's CPU per call (all its
  threads, Ray's included), for plain actor calls (``await actor.predict.remote(x)``
  from asyncio, round-robin over 2 actors: the floor any Ray backend pays), the Ray
  pool and the process pool. The Ray pool should stay within about 1.2x of plain calls.
- ``4mb``: a 4 MiB FP32 identity round trip, one worker, sequential: p50 and MB/s.
- ``scaling``: a CPU-bound predict (about 10 ms of single-threaded numpy), 8 callers,
  throughput with 1 and 2 workers, for both backends, and the cores the workers got
  (on a busy machine a second worker finds no free core, and the ratio shows it).

Run from the repository root, with ``v2mount[ray,sklearn]`` installed (asyncio only:
plain actor calls are awaited the asyncio way):

    python -m benchmarks.ray_pool               # everything
    python -m benchmarks.ray_pool --quick       # a quarter of the calls
    python -m benchmarks.ray_pool --only iris

A local Ray starts with ``num_cpus=2``, its dashboard and usage statistics off.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

from benchmarks.pool_overhead import (
    Burn,
    Identity,
    cpu_seconds,
    fp32,
    ignore,
    percentiles,
    timed_calls,
)
from v2mount.model import Model
from v2mount.pool import WorkerPool
from v2mount.ray_pool import RayPool
from v2mount.runner import InProcessRunner, Runner
from v2mount.types import InferenceRequest, Tensor


class Iris(Model):
    """LogisticRegression on iris, trained in ``load`` (scikit-learn ships the data)."""

    name = "iris"

    def load(self) -> None:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        x, y = load_iris(return_X_y=True)
        self.classifier = LogisticRegression(max_iter=500).fit(x, y)

    def predict(self, payload: InferenceRequest) -> Any:
        return {"label": self.classifier.predict(payload["x"])}


class PlainActor:
    """The baseline: the same predict in a bare Ray actor, no v2mount in between."""

    def __init__(self) -> None:
        model = Iris()
        model.load()
        self.classifier = model.classifier

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return self.classifier.predict(x)  # type: ignore[no-any-return]


def iris_request() -> InferenceRequest:
    x = np.array([[5.1, 3.5, 1.4, 0.2]])
    return InferenceRequest([Tensor("x", "FP64", x.shape, x)])


async def ray_pool_of(model: Model, workers: int, **options: Any) -> RayPool:
    options.setdefault("actor_options", {"num_cpus": 1})
    pool = RayPool(model, workers, max_queue_size=1024, metrics_sink=ignore, **options)
    await pool.start()
    return pool


async def process_pool_of(model: Model, workers: int, **options: Any) -> WorkerPool:
    pool = WorkerPool(model, workers, max_queue_size=1024, metrics_sink=ignore, **options)
    await pool.start()
    return pool


async def hop(calls: int) -> None:
    request = fp32(4)
    inproc = InProcessRunner(Identity(), 1024, ignore)
    await inproc.start()
    rows = {"InProcessRunner.infer": percentiles(await timed_calls(inproc, request, calls))}
    for label, make in (
        ("WorkerPool.infer (1 worker)", process_pool_of),
        ("RayPool.infer (1 actor)", ray_pool_of),
    ):
        pool: Runner = await make(Identity(), 1)
        try:
            rows[label] = percentiles(await timed_calls(pool, request, calls))
        finally:
            await pool.stop()
    print(f"tiny model, {calls} sequential calls (ms)      p50      p99")
    for label, (p50, p99) in rows.items():
        print(f"  {label:<40} {p50:7.3f}  {p99:7.3f}")


async def concurrent(call: Callable[[], Awaitable[Any]], concurrency: int, calls: int) -> tuple:
    """Calls/s of ``concurrency`` callers making ``calls`` in all, and CPU ms per call."""
    for _ in range(20):
        await call()
    done = 0

    async def caller() -> None:
        nonlocal done
        while done < calls:
            done += 1
            await call()

    cpu, start = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(caller)
    elapsed = time.perf_counter() - start
    return calls / elapsed, (time.process_time() - cpu) / calls * 1e3


async def iris(calls: int) -> None:
    import ray

    request = iris_request()
    x = request.inputs[0].data
    actors = [ray.remote(num_cpus=1)(PlainActor).remote() for _ in range(2)]
    await anyio.to_thread.run_sync(ray.get, [a.predict.remote(x) for a in actors])
    turn = itertools.cycle(actors)

    async def plain() -> Any:
        return await next(turn).predict.remote(x)

    results: dict[str, dict[int, tuple]] = {"plain actor calls": {}}
    levels = (1, 16, 64)
    for level in levels:
        results["plain actor calls"][level] = await concurrent(plain, level, calls)
    for actor in actors:
        ray.kill(actor)
    for label, make in (("RayPool (2 actors)", ray_pool_of), ("WorkerPool (2)", process_pool_of)):
        pool: Runner = await make(Iris(), 2)
        try:
            results[label] = {
                level: await concurrent(lambda p=pool: p.infer(request), level, calls)
                for level in levels
            }
        finally:
            await pool.stop()
    print(f"iris LogisticRegression, 2 workers, {calls} calls per level")
    print("  calls/s (caller CPU ms per call)      " + "".join(f"c={c:<15}" for c in levels))
    for label, row in results.items():
        cells = "".join(f"{rate:7.0f} ({cpu:4.2f})   " for rate, cpu in row.values())
        print(f"  {label:<36} {cells}")
    base = results["plain actor calls"]
    ratios = "  ".join(
        f"c={c}: {base[c][0] / results['RayPool (2 actors)'][c][0]:.2f}x" for c in levels
    )
    print(f"  RayPool cost against plain calls (time per call): {ratios}")


async def big_tensor(calls: int) -> None:
    request = fp32(1 << 20)
    mebibytes = request.inputs[0].data.nbytes / (1 << 20)
    print(f"4 MiB FP32 identity round trip, {calls} calls     p50 ms  p99 ms    MB/s")
    for label, make in (
        ("WorkerPool (1 worker, shared memory)", process_pool_of),
        ("RayPool (1 actor, object store)", ray_pool_of),
    ):
        pool: Runner = await make(Identity(), 1)
        try:
            p50, p99 = percentiles(await timed_calls(pool, request, calls))
        finally:
            await pool.stop()
        print(f"  {label:<40} {p50:7.2f} {p99:7.2f} {mebibytes / p50 * 1e3:7.0f}")


async def scaling(calls: int, rounds: int) -> None:
    """Throughput with 1 and 2 workers, and the cores the workers got meanwhile."""
    request = InferenceRequest([Tensor("rounds", "INT64", (1,), np.array([rounds]))])
    print(f"CPU-bound predict, 8 callers, {calls} calls     1 worker (cores)  2 workers (cores)")
    for label, make in (("WorkerPool", process_pool_of), ("RayPool", ray_pool_of)):
        rates, cores = [], []
        for workers in (1, 2):
            pool: Any = await make(Burn(), workers, threads_per_worker=1)
            try:
                await timed_calls(pool, request, 4)
                pids = pool.pids()
                cpu, start = cpu_seconds(pids), time.perf_counter()
                rates.append((await concurrent(lambda p=pool: p.infer(request), 8, calls))[0])
                cores.append((cpu_seconds(pids) - cpu) / (time.perf_counter() - start))
            finally:
                await pool.stop()
        cells = "  ".join(
            f"{rate:7.1f} ({got:4.2f})" for rate, got in zip(rates, cores, strict=True)
        )
        print(f"  {label:<36} {cells}   ratio {rates[1] / rates[0]:4.2f}")


async def main(quick: bool, only: str | None) -> None:
    import ray

    scale = 4 if quick else 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "hop": lambda: hop(2000 // scale),
        "iris": lambda: iris(2000 // scale),
        "4mb": lambda: big_tensor(200 // scale),
        "scaling": lambda: scaling(400 // scale, rounds=36),
    }
    try:
        for name, step in steps.items():
            if only in (None, name):
                await step()
                print()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the calls")
    parser.add_argument("--only", choices=["hop", "iris", "4mb", "scaling"])
    args = parser.parse_args()
    # Ray reads these when it is imported and when it starts its processes; set before
    # either, in this script only: no usage statistics, and a one-node Ray on 127.0.0.1.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    load = os.getloadavg()
    print(f"python {platform.python_version()}, asyncio, {os.cpu_count()} cores, load {load}\n")
    anyio.run(main, args.quick, args.only)
