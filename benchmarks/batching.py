"""Adaptive batching in-process: throughput, p99 and CPU per request, batching off and on.

Calls ``AdaptiveBatcher.infer`` (or, batching off, ``InProcessRunner.infer``) directly
from N closed-loop client tasks, so the figures show what batching itself buys and
costs, with no HTTP in the way. The model is a two-layer perceptron (64 → 1536 → 1536
→ 1, float32): one row costs about as much as a few dozen, because reading the 9 MB
hidden weight matrix dominates, which is how vectorised numpy / ONNX / torch models
behave. The ``overhead`` points serve a model that does nothing with
``max_batch_time=0`` (``overhead-slo``: the predictive batcher, 50 ms SLO): at
concurrency 1 every request is a batch of its own, so the difference to batching off is
the batcher's own cost per batch.

Every point runs ``--repeat`` times, the rounds interleaved, and the report gives the
median: on a shared machine wall-clock figures move a lot, CPU time per request less.
Run with one BLAS thread so the model uses one core, like a pool worker:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m benchmarks.batching
    python -m benchmarks.batching --quick --backend trio   # a smaller grid

It prints a Markdown report (``--json FILE`` also writes every measurement).

``--sweep`` compares instead how batches are *timed* under open-loop Poisson traffic at
offered loads from 20 % to 150 % of the model's capacity: the fixed window
(``max_batch_time`` 10 ms and 50 ms), the same 10 ms window sending early when idle
(``batching: {}``), and predictive batching under a 200 ms SLO (``batching:
{"slo_ms": 200}``). The model there sleeps ``a + c·rows`` (20 ms + 2 ms a row, like an
accelerator or a remote call), so the figures show the batching policy, not the CPU;
latency counts from each request's scheduled arrival, so a lagging sender is not hidden,
and "goodput" counts the requests answered within the SLO.

    python -m benchmarks.batching --sweep --chart benchmarks/results/batching-slo.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from v2mount.batching import AdaptiveBatcher, Policy, PredictiveBatcher
from v2mount.errors import Overloaded
from v2mount.model import Model
from v2mount.runner import InProcessRunner
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

FEATURES = 64
HIDDEN = 1536
CONCURRENCIES = (1, 16, 64)
SIZES = (8, 16, 32, 64)
TIMES = (0.0, 0.0005, 0.001, 0.002, 0.005)
QUICK_SIZES = (16, 32)
QUICK_TIMES = (0.0, 0.002)

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
class Point:
    mode: str  # "off", "on", "overhead-off", "overhead-on" or "overhead-slo"
    concurrency: int
    max_batch_size: int = 0
    max_batch_time: float = 0.0

    @property
    def batching(self) -> bool:
        return self.mode.endswith(("on", "slo"))


@dataclass(frozen=True)
class Figure:
    point: Point
    requests: int
    throughput: float  # requests per second
    p50_ms: float
    p99_ms: float
    cpu_us: float  # process CPU time (all threads) per request
    mean_batch_rows: float


async def closed_loop(
    infer: Infer, concurrency: int, duration: float, think: float
) -> tuple[int, float, float, list[float]]:
    """``concurrency`` clients, each sending its next request when the last is answered.

    With several clients, each pauses a random ``0 .. think`` seconds (asyncio rounds
    timers up to the millisecond) between requests, so that clients answered by the same
    batch do not all come back in lock-step, as HTTP clients don't. Returns the requests
    answered, the seconds and CPU seconds they took, and their latencies.
    """
    latencies: list[float] = []
    rng = np.random.default_rng(concurrency)
    pauses = (rng.random(4096) * think).tolist() if concurrency > 1 else [0.0]
    requests = [
        InferenceRequest([Tensor("x", "FP32", (1, FEATURES), row[None, :])], id=str(index))
        for index, row in enumerate(rng.standard_normal((concurrency, FEATURES), np.float32))
    ]

    async def client(request: InferenceRequest, stop_at: float, record: bool) -> None:
        turn = int(request.id or 0)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await infer(request)
            if record:
                latencies.append(time.perf_counter() - started)
            turn += 1
            if pauses[turn % len(pauses)]:
                await anyio.sleep(pauses[turn % len(pauses)])

    for record, seconds in ((False, min(0.2, duration)), (True, duration)):
        started, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as group:
            for request in requests:
                group.start_soon(client, request, started + seconds, record)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return len(latencies), elapsed, cpu, latencies


async def measure(model: Model, point: Point, duration: float, think: float) -> Figure:
    runner = InProcessRunner(model, max_queue_size=100_000, metrics_sink=lambda updates: None)
    await runner.start()
    infer: Infer = runner.infer
    batches: list[int] = []
    if point.mode == "overhead-slo":  # the predictive batcher, nothing to wait for
        policy = Policy(point.max_batch_size, slo=0.05, max_queue=100_000)
        infer = PredictiveBatcher(runner, policy, on_batch=lambda r: batches.append(r.rows)).infer
    elif point.batching:
        batcher = AdaptiveBatcher(
            runner,
            max_batch_size=point.max_batch_size,
            max_batch_time=point.max_batch_time,
            on_batch=batches.append,
        )
        infer = batcher.infer
    count, elapsed, cpu, latencies = await closed_loop(infer, point.concurrency, duration, think)
    await runner.stop()
    milliseconds = np.asarray(latencies) * 1000
    return Figure(
        point=point,
        requests=count,
        throughput=count / elapsed,
        p50_ms=float(np.percentile(milliseconds, 50)),
        p99_ms=float(np.percentile(milliseconds, 99)),
        cpu_us=cpu / count * 1e6,
        mean_batch_rows=float(np.mean(batches)) if batches else 1.0,
    )


def grid(sizes: Sequence[int], times: Sequence[float]) -> list[Point]:
    points = [
        Point(mode, concurrency, 0 if mode == "overhead-off" else 64)
        for concurrency in (1, 16)
        for mode in ("overhead-off", "overhead-on", "overhead-slo")
    ]
    for concurrency in CONCURRENCIES:
        points.append(Point("off", concurrency))
        points += [Point("on", concurrency, s, t) for s in sizes for t in times]
    return points


async def run_all(
    points: Sequence[Point],
    repeat: int,
    duration: float,
    think: float,
    log: Callable[[str], None],
) -> list[Figure]:
    models = {"overhead": Nothing(), "model": Perceptron()}
    figures: list[Figure] = []
    for round_ in range(1, repeat + 1):
        for point in points:
            model = models["overhead" if point.mode.startswith("overhead") else "model"]
            f = await measure(model, point, duration, think)
            figures.append(f)
            log(
                f"[{round_}/{repeat}] {point.mode:>12} c={point.concurrency:<3}"
                f" size={point.max_batch_size:<3} time={point.max_batch_time * 1000:<4g}ms"
                f" {f.throughput:7.0f} req/s  p99 {f.p99_ms:7.2f} ms"
                f"  cpu {f.cpu_us:6.0f} us/req  rows/batch {f.mean_batch_rows:.1f}"
            )
    return figures


def medians(figures: Sequence[Figure]) -> dict[Point, Figure]:
    """One figure per point: the median of its rounds, field by field."""
    rounds: dict[Point, list[Figure]] = {}
    for f in figures:
        rounds.setdefault(f.point, []).append(f)
    return {
        point: Figure(
            point=point,
            requests=sum(f.requests for f in runs),
            throughput=statistics.median(f.throughput for f in runs),
            p50_ms=statistics.median(f.p50_ms for f in runs),
            p99_ms=statistics.median(f.p99_ms for f in runs),
            cpu_us=statistics.median(f.cpu_us for f in runs),
            mean_batch_rows=statistics.median(f.mean_batch_rows for f in runs),
        )
        for point, runs in rounds.items()
    }


def best_setting(table: dict[Point, Figure]) -> tuple[int, float, float]:
    """The (size, time) with the best geometric mean of throughput gain over all loads."""
    off = {p.concurrency: f.throughput for p, f in table.items() if p.mode == "off"}
    logs: dict[tuple[int, float], list[float]] = {}
    for p, f in table.items():
        if p.mode == "on":
            gain = math.log(f.throughput / off[p.concurrency])
            logs.setdefault((p.max_batch_size, p.max_batch_time), []).append(gain)
    (size, seconds), gains = max(logs.items(), key=lambda item: sum(item[1]))
    return size, seconds, math.exp(sum(gains) / len(gains))


def report(table: dict[Point, Figure], args: argparse.Namespace) -> str:
    lines = [
        f"# Adaptive batching, in-process ({args.backend}, Python"
        f" {platform.python_version()}, median of {args.repeat} x {args.duration:g} s per"
        f" point, think time 0-{args.think * 1000:g} ms)",
        "",
        "| mode | concurrency | max_batch_size | max_batch_time (ms) | req/s | p50 (ms)"
        " | p99 (ms) | CPU µs/req | rows/batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p, f in table.items():
        size = str(p.max_batch_size) if p.batching else "-"
        wait = f"{p.max_batch_time * 1000:g}" if p.batching else "-"
        lines.append(
            f"| {p.mode} | {p.concurrency} | {size} | {wait} | {f.throughput:.0f}"
            f" | {f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.cpu_us:.0f} | {f.mean_batch_rows:.1f} |"
        )
    lines += ["", "Best per concurrency (highest req/s with batching on):", ""]
    for concurrency in CONCURRENCIES:
        off = table[Point("off", concurrency)]
        on = max(
            (f for p, f in table.items() if p.mode == "on" and p.concurrency == concurrency),
            key=lambda f: f.throughput,
        )
        lines.append(
            f"- c={concurrency}: off {off.throughput:.0f} req/s, p99 {off.p99_ms:.2f} ms;"
            f" on {on.throughput:.0f} req/s, p99 {on.p99_ms:.2f} ms with"
            f" max_batch_size={on.point.max_batch_size},"
            f" max_batch_time={on.point.max_batch_time:g}"
        )
    best_size, best_time, gain = best_setting(table)
    lines += [
        "",
        f"Best overall (geometric mean of the gain over c = {', '.join(map(str, CONCURRENCIES))}):"
        f" max_batch_size={best_size}, max_batch_time={best_time:g} ({gain:.2f}x).",
    ]
    return "\n".join(lines)


# -- the sweep: how batches are timed, under open-loop load ----------------------------

SWEEP_A, SWEEP_C, SWEEP_SIZE, SWEEP_SLO = 0.020, 0.002, 32, 0.200
SWEEP_LOADS = (0.2, 0.5, 0.8, 1.0, 1.2, 1.5)
SWEEP_MODES = ("fixed 10 ms", "fixed 50 ms", "fixed 10 ms + idle", "predictive 200 ms")


class Sleeper(Model):
    """Takes ``a + c·rows`` seconds (asleep: no CPU) and doubles ``x``."""

    name = "sleeper"

    def predict(self, payload: InferenceRequest) -> Any:
        x = payload["x"]
        time.sleep(SWEEP_A + SWEEP_C * len(x))
        return {"y": x * 2}


@dataclass(frozen=True)
class SweepFigure:
    mode: str
    load: float  # offered, as a share of capacity
    offered: float  # requests per second sent
    served: float  # requests per second answered (however late)
    goodput: float  # requests per second answered within SWEEP_SLO
    refused_share: float
    p50_ms: float
    p99_ms: float
    over_slo_share: float  # answered after SWEEP_SLO
    mean_batch_rows: float


def sweep_batcher(mode: str, runner: InProcessRunner, on_batch: Callable[[int], None]) -> Infer:
    wait = 0.010 if "10 ms" in mode else 0.050
    if mode.startswith("fixed") and not mode.endswith("idle"):
        return AdaptiveBatcher(
            runner, max_batch_size=SWEEP_SIZE, max_batch_time=wait, on_batch=on_batch
        ).infer
    policy = (
        Policy(SWEEP_SIZE, slo=SWEEP_SLO, max_queue=100_000)
        if mode.startswith("predictive")
        else Policy(SWEEP_SIZE, max_wait=wait, max_queue=100_000)
    )
    return PredictiveBatcher(runner, policy, on_batch=lambda report: on_batch(report.rows)).infer


async def sweep_point(mode: str, load: float, duration: float, seed: int) -> SweepFigure:
    """Poisson arrivals at ``load`` times capacity for ``duration`` s (after a 1 s warm-up)."""
    capacity = SWEEP_SIZE / (SWEEP_A + SWEEP_C * SWEEP_SIZE)
    rate = load * capacity
    runner = InProcessRunner(Sleeper(), max_queue_size=100_000, metrics_sink=lambda u: None)
    await runner.start()
    rows: list[int] = []
    infer = sweep_batcher(mode, runner, rows.append)
    rng = np.random.default_rng(seed)
    warmup = 1.0
    gaps = rng.exponential(1 / rate, int(rate * (warmup + duration) * 1.2) + 10)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < warmup + duration]
    latencies: list[float] = []
    refused = 0
    x = np.ones((1, 1), np.float32)

    async def one(scheduled: float, record: bool) -> None:
        nonlocal refused
        try:
            await infer(InferenceRequest([Tensor("x", "FP32", (1, 1), x)]))
        except Overloaded:
            refused += record
            return
        if record:
            latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for offset in arrivals:
            scheduled = start + float(offset)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            group.start_soon(one, scheduled, bool(offset >= warmup))
    await runner.stop()
    sent = int(np.sum(arrivals >= warmup))
    milliseconds = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return SweepFigure(
        mode=mode,
        load=load,
        offered=sent / duration,
        served=len(latencies) / duration,
        goodput=float(np.sum(milliseconds <= SWEEP_SLO * 1000)) / duration if latencies else 0,
        refused_share=refused / max(1, sent),
        p50_ms=float(np.percentile(milliseconds, 50)),
        p99_ms=float(np.percentile(milliseconds, 99)),
        over_slo_share=float(np.mean(milliseconds > SWEEP_SLO * 1000)),
        mean_batch_rows=float(np.mean(rows)) if rows else 0.0,
    )


async def run_sweep(
    duration: float, loads: Sequence[float], log: Callable[[str], None]
) -> list[SweepFigure]:
    figures = []
    for load in loads:
        for mode in SWEEP_MODES:
            f = await sweep_point(mode, load, duration, seed=int(load * 100))
            figures.append(f)
            log(
                f"{mode:>18} load {load:4.0%}  offered {f.offered:6.0f}/s served"
                f" {f.served:6.0f}/s good {f.goodput:6.0f}/s refused {f.refused_share:5.1%}"
                f"  p50 {f.p50_ms:7.1f} ms"
                f"  p99 {f.p99_ms:8.1f} ms  >SLO {f.over_slo_share:5.1%}"
                f"  rows/batch {f.mean_batch_rows:4.1f}"
            )
    return figures


def sweep_report(figures: Sequence[SweepFigure], args: argparse.Namespace) -> str:
    capacity = SWEEP_SIZE / (SWEEP_A + SWEEP_C * SWEEP_SIZE)
    lines = [
        f"# Batch timing under open-loop Poisson load ({args.backend}, Python"
        f" {platform.python_version()}, {args.duration:g} s per point after 1 s of warm-up;"
        f" model 20 ms + 2 ms a row, max_batch_size {SWEEP_SIZE}, capacity"
        f" {capacity:.0f} req/s)",
        "",
        "| mode | offered load | offered req/s | answered req/s | within SLO req/s | refused"
        f" | p50 (ms) | p99 (ms) | answered > {SWEEP_SLO * 1000:g} ms | rows/batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in figures:
        lines.append(
            f"| {f.mode} | {f.load:.0%} | {f.offered:.0f} | {f.served:.0f} | {f.goodput:.0f}"
            f" | {f.refused_share:.1%} | {f.p50_ms:.1f} | {f.p99_ms:.1f}"
            f" | {f.over_slo_share:.1%} | {f.mean_batch_rows:.1f} |"
        )
    return "\n".join(lines)


def sweep_chart(figures: Sequence[SweepFigure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, served) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in SWEEP_MODES:
        points = [f for f in figures if f.mode == mode]
        loads = [100 * f.load for f in points]
        latency.plot(loads, [f.p99_ms for f in points], marker="o", label=mode)
        served.plot(loads, [f.goodput for f in points], marker="o", label=mode)
    latency.axhline(SWEEP_SLO * 1000, color="grey", linestyle="--", linewidth=1)
    latency.set(yscale="log", xlabel="offered load (% of capacity)", ylabel="p99 latency (ms)")
    latency.set_title(f"p99 of answered requests (dashed: {SWEEP_SLO * 1000:g} ms SLO)")
    served.set(xlabel="offered load (% of capacity)", ylabel="req/s answered within the SLO")
    served.set_title("goodput")
    served.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per point")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the grid")
    parser.add_argument("--quick", action="store_true", help="a 2 x 2 grid of settings")
    parser.add_argument(
        "--think", type=float, default=0.0005, help="max seconds a client pauses between requests"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--sweep", action="store_true", help="fixed window vs predictive, open-loop load"
    )
    parser.add_argument("--chart", type=Path, help="--sweep: draw the figures here (PNG)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.sweep:
        swept = anyio.run(run_sweep, args.duration, SWEEP_LOADS, log, backend=args.backend)
        print()
        print(sweep_report(swept, args))
        if args.json:
            args.json.write_text(json.dumps([asdict(f) for f in swept], indent=1))
        if args.chart:
            sweep_chart(swept, args.chart)
        return
    points = grid(*((QUICK_SIZES, QUICK_TIMES) if args.quick else (SIZES, TIMES)))
    figures = anyio.run(
        run_all, points, args.repeat, args.duration, args.think, log, backend=args.backend
    )
    print()
    print(report(medians(figures), args))
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=1))


if __name__ == "__main__":
    main()
