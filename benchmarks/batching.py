"""Adaptive batching in-process: throughput and p99 with batching off and on.

Calls ``AdaptiveBatcher.infer`` (or, batching off, ``InProcessRunner.infer``) directly
from N closed-loop client tasks, so the figures show what batching itself buys and
costs, with no HTTP in the way. The model is a two-layer perceptron (64 → 1536 → 1536
→ 1, float32): one row costs about as much as a few dozen, because reading the 9 MB
hidden weight matrix dominates, which is how vectorised numpy / ONNX / torch models
behave. ``overhead`` rows time a model that does nothing, with ``max_batch_size=1``,
so every request is its own batch: that is the batcher's own cost per request.

Run with one BLAS thread so the model uses one core, like a pool worker:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m benchmarks.batching
    python -m benchmarks.batching --quick --backend trio   # a smaller grid

It prints a Markdown report (``--json FILE`` also writes the raw figures).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from v2mount.batching import AdaptiveBatcher
from v2mount.model import Model
from v2mount.runner import InProcessRunner
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

FEATURES = 64
HIDDEN = 1536
CONCURRENCIES = (1, 16, 64)
SIZES = (4, 8, 16, 32, 64)
TIMES = (0.0005, 0.001, 0.002, 0.005)
QUICK_SIZES = (8, 32)
QUICK_TIMES = (0.001, 0.005)

Infer = Callable[[InferenceRequest], Awaitable[InferenceResponse]]


class Perceptron(Model):
    """``x[n, 64] -> y[n, 1]``; the cost of a call grows slowly with ``n``."""

    name = "perceptron"

    def load(self) -> None:
        rng = np.random.default_rng(7)
        self.w1 = rng.standard_normal((FEATURES, HIDDEN), dtype=np.float32) / 8
        self.w2 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) / np.float32(
            math.sqrt(HIDDEN)
        )
        self.w3 = rng.standard_normal((HIDDEN, 1), dtype=np.float32)

    def predict(self, payload: InferenceRequest) -> Any:
        hidden = np.tanh(np.tanh(payload["x"] @ self.w1) @ self.w2)
        return {"y": hidden @ self.w3}


class Nothing(Model):
    """Returns its input: what remains is the cost of serving a call."""

    name = "nothing"

    def predict(self, payload: InferenceRequest) -> Any:
        return {"y": payload["x"]}


@dataclass(frozen=True)
class Figure:
    mode: str  # "off", "on" or "overhead-off" / "overhead-on"
    concurrency: int
    max_batch_size: int
    max_batch_time: float
    requests: int
    throughput: float  # requests per second
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float


async def closed_loop(
    infer: Infer, concurrency: int, duration: float
) -> tuple[int, float, list[float]]:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    latencies: list[float] = []
    rng = np.random.default_rng(concurrency)
    requests = [
        InferenceRequest([Tensor("x", "FP32", (1, FEATURES), row[None, :])], id=str(index))
        for index, row in enumerate(rng.standard_normal((concurrency, FEATURES), np.float32))
    ]

    async def client(request: InferenceRequest, stop_at: float, record: bool) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await infer(request)
            if record:
                latencies.append(time.perf_counter() - started)

    for record, seconds in ((False, min(0.3, duration)), (True, duration)):
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for request in requests:
                group.start_soon(client, request, started + seconds, record)
        elapsed = time.perf_counter() - started
    return len(latencies), elapsed, latencies


async def measure(
    model: Model,
    mode: str,
    concurrency: int,
    duration: float,
    max_batch_size: int = 0,
    max_batch_time: float = 0.0,
) -> Figure:
    runner = InProcessRunner(model, max_queue_size=100_000, metrics_sink=lambda updates: None)
    await runner.start()
    infer: Infer = runner.infer
    batches: list[int] = []
    if mode.endswith("on"):
        batcher = AdaptiveBatcher(
            runner,
            max_batch_size=max_batch_size,
            max_batch_time=max_batch_time,
            on_batch=batches.append,
        )
        infer = batcher.infer
    count, elapsed, latencies = await closed_loop(infer, concurrency, duration)
    await runner.stop()
    ordered = np.sort(np.asarray(latencies)) * 1000
    return Figure(
        mode=mode,
        concurrency=concurrency,
        max_batch_size=max_batch_size,
        max_batch_time=max_batch_time,
        requests=count,
        throughput=count / elapsed,
        p50_ms=float(np.percentile(ordered, 50)),
        p99_ms=float(np.percentile(ordered, 99)),
        mean_batch_rows=float(np.mean(batches)) if batches else 1.0,
    )


async def run_all(
    sizes: Sequence[int], times: Sequence[float], duration: float, log: Callable[[str], None]
) -> list[Figure]:
    figures: list[Figure] = []

    async def add(*args: Any, **kwargs: Any) -> None:
        figure = await measure(*args, **kwargs)
        figures.append(figure)
        log(
            f"{figure.mode:>12} c={figure.concurrency:<3} size={figure.max_batch_size:<3}"
            f" time={figure.max_batch_time * 1000:g}ms  {figure.throughput:8.0f} req/s"
            f"  p99 {figure.p99_ms:7.2f} ms  rows/batch {figure.mean_batch_rows:.1f}"
        )

    for concurrency in (1, 16):
        await add(Nothing(), "overhead-off", concurrency, duration)
        await add(Nothing(), "overhead-on", concurrency, duration, 1, 0.0)
    perceptron = Perceptron()
    for concurrency in CONCURRENCIES:
        await add(perceptron, "off", concurrency, duration)
        for size in sizes:
            for seconds in times:
                await add(perceptron, "on", concurrency, duration, size, seconds)
    return figures


def best_setting(figures: Sequence[Figure]) -> tuple[int, float, float]:
    """The (size, time) with the best geometric mean of throughput gain over all loads."""
    off = {f.concurrency: f.throughput for f in figures if f.mode == "off"}
    scores: dict[tuple[int, float], list[float]] = {}
    for f in figures:
        if f.mode == "on":
            scores.setdefault((f.max_batch_size, f.max_batch_time), []).append(
                math.log(f.throughput / off[f.concurrency])
            )
    (size, seconds), logs = max(scores.items(), key=lambda item: sum(item[1]))
    return size, seconds, math.exp(sum(logs) / len(logs))


def report(figures: Sequence[Figure], backend: str, duration: float) -> str:
    lines = [
        f"# Adaptive batching, in-process ({backend}, {platform.python_version()},"
        f" {duration:g} s per point)",
        "",
        "| mode | concurrency | max_batch_size | max_batch_time (ms) | req/s | p50 (ms)"
        " | p99 (ms) | rows/batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in figures:
        size = str(f.max_batch_size) if f.mode.endswith("on") else "-"
        wait = f"{f.max_batch_time * 1000:g}" if f.mode.endswith("on") else "-"
        lines.append(
            f"| {f.mode} | {f.concurrency} | {size} | {wait} | {f.throughput:.0f}"
            f" | {f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.mean_batch_rows:.1f} |"
        )
    lines += ["", "Best per concurrency (highest req/s with batching on):", ""]
    for concurrency in CONCURRENCIES:
        off = next(f for f in figures if f.mode == "off" and f.concurrency == concurrency)
        on = max(
            (f for f in figures if f.mode == "on" and f.concurrency == concurrency),
            key=lambda f: f.throughput,
        )
        lines.append(
            f"- c={concurrency}: off {off.throughput:.0f} req/s (p99 {off.p99_ms:.2f} ms);"
            f" on {on.throughput:.0f} req/s (p99 {on.p99_ms:.2f} ms) with"
            f" max_batch_size={on.max_batch_size}, max_batch_time={on.max_batch_time:g}"
        )
    size, seconds, gain = best_setting(figures)
    lines += [
        "",
        f"Best overall (geometric mean of the gain over c = {', '.join(map(str, CONCURRENCIES))}):"
        f" max_batch_size={size}, max_batch_time={seconds:g} ({gain:.2f}x).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true", help="a 2 x 2 grid of settings")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    sizes, times = (QUICK_SIZES, QUICK_TIMES) if args.quick else (SIZES, TIMES)

    def log(line: str) -> None:
        print(line, flush=True)

    figures = anyio.run(run_all, sizes, times, args.duration, log, backend=args.backend)
    print()
    print(report(figures, args.backend, args.duration))
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=1))


if __name__ == "__main__":
    main()
