"""What pre/post-processing stages buy: the same work as stages or all inside ``predict``.

MLServer has no stages, so this compares v2mount with v2mount: ``models/bench_stages.py``
does per request a few ms of numpy "image" preparation, then a linear layer whose cost
hardly grows with the batch, then a softmax. Setups, all on a pool of ``--workers``
worker processes (one BLAS thread each):

- ``stages``: preprocess and postprocess per request in the workers, ``predict`` on
  batches (``max_batch_size`` 8, ``max_batch_time`` ``--batch-time``): a batch's worth
  of requests that waited together for a worker in one trip, the others preprocessed
  then merged by the adaptive batcher;
- ``predict``: everything in ``predict``, same batching (a batch's preprocessing then
  runs row after row in one worker);
- ``predict-unbatched``: everything in ``predict``, batching off (the reference most
  users start from);
- ``stages-unbatched``: stages with batching off (one trip to a worker per request).

``--concurrency`` closed-loop clients call ``ModelHandle.infer`` directly (no HTTP), the
way a request goes after decoding; each setup runs ``--repeat`` times, the rounds
interleaved, and the report gives medians of throughput and latency, the mean rows per
``predict`` call, and ratios. ``--blur-passes`` makes the preprocessing heavier.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.stages
    python -m benchmarks.stages --duration 3 --repeat 1     # a quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from benchmarks.models.bench_stages import SIDE, Monolith, Staged
from v2mount import V2App
from v2mount.model import Model
from v2mount.types import InferenceRequest, Tensor

SETUPS = ("stages", "predict", "predict-unbatched", "stages-unbatched")


@dataclass(frozen=True)
class Figure:
    setup: str
    requests: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the web process's CPU time (all threads) per request
    batch: float  # mean requests per predict call


def model_for(setup: str, workers: int, batch_time: float, blur_passes: int = 1) -> Model:
    batched = not setup.endswith("unbatched")
    settings: dict[str, Any] = {
        "parallel_workers": workers,
        "threads_per_worker": 1,
        "max_batch_size": 8 if batched else 1,
        "max_batch_time": batch_time,
        "inference_timeout": 120,
    }
    model = (Staged if setup.startswith("stages") else Monolith)(**settings)
    model.blur_passes = blur_passes
    return model


def predict_calls(app: V2App) -> tuple[float, float]:
    """``predict`` calls and their rows so far (the models count them as custom metrics)."""
    registry = app.metrics.registry
    calls = registry.get_sample_value("bench_predict_calls_total") or 0.0
    return calls, registry.get_sample_value("bench_predict_rows_total") or 0.0


async def closed_loop(
    app: V2App, name: str, setup: str, concurrency: int, duration: float
) -> Figure:
    handle = app.registry.get(name)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (concurrency, 1, SIDE, SIDE, 3), dtype=np.uint8)
    latencies: list[float] = []

    async def client(image: np.ndarray[Any, Any], stop_at: float, record: bool) -> None:
        while time.perf_counter() < stop_at:
            request = InferenceRequest([Tensor("image", "UINT8", image.shape, image)])
            started = time.perf_counter()
            await handle.infer(request)
            if record:
                latencies.append(time.perf_counter() - started)

    elapsed = cpu = calls = rows = 0.0
    for record, seconds in ((False, min(1.0, duration)), (True, duration)):
        started, cpu = time.perf_counter(), time.process_time()
        before = predict_calls(app)
        async with anyio.create_task_group() as group:
            for image in images:
                group.start_soon(client, image, started + seconds, record)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        after = predict_calls(app)
        calls, rows = after[0] - before[0], after[1] - before[1]
    milliseconds = np.asarray(latencies) * 1000
    return Figure(
        setup=setup,
        requests=len(latencies),
        throughput=len(latencies) / elapsed,
        p50_ms=float(np.percentile(milliseconds, 50)),
        p99_ms=float(np.percentile(milliseconds, 99)),
        cpu_us=cpu / len(latencies) * 1e6,
        batch=rows / calls if calls else 1.0,
    )


async def run(arguments: argparse.Namespace) -> dict[str, list[Figure]]:
    figures: dict[str, list[Figure]] = {setup: [] for setup in arguments.setups}
    for _ in range(arguments.repeat):
        for setup in arguments.setups:
            model = model_for(setup, arguments.workers, arguments.batch_time, arguments.blur_passes)
            app = V2App([model])
            async with app.lifespan():
                figure = await closed_loop(
                    app, model.settings.name, setup, arguments.concurrency, arguments.duration
                )
            figures[setup].append(figure)
    return figures


def report(figures: dict[str, list[Figure]], arguments: argparse.Namespace) -> str:
    median = {
        setup: Figure(
            setup,
            sum(f.requests for f in runs),
            statistics.median(f.throughput for f in runs),
            statistics.median(f.p50_ms for f in runs),
            statistics.median(f.p99_ms for f in runs),
            statistics.median(f.cpu_us for f in runs),
            statistics.median(f.batch for f in runs),
        )
        for setup, runs in figures.items()
    }
    staged = median.get("stages", next(iter(median.values())))
    lines = [
        f"pool of {arguments.workers} workers, {arguments.concurrency} clients, "
        f"{arguments.duration:g} s x {arguments.repeat} per setup (medians), "
        f"max_batch_time {arguments.batch_time:g} s, {arguments.blur_passes} blur pass(es); "
        f"{platform.python_version()}, {platform.machine()}",
        "",
        "| setup | req/s | p50 ms | p99 ms | web CPU µs/req | mean batch "
        "| stages' req/s ÷ this | this p50 ÷ stages' |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setup, f in median.items():
        lines.append(
            f"| {setup} | {f.throughput:.0f} | {f.p50_ms:.1f} | {f.p99_ms:.1f} | {f.cpu_us:.0f} "
            f"| {f.batch:.1f} | {staged.throughput / f.throughput:.2f} "
            f"| {f.p50_ms / staged.p50_ms:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-time", type=float, default=0.005)
    parser.add_argument(
        "--blur-passes", type=int, default=1, help="heavier preprocessing: more passes"
    )
    parser.add_argument("--setups", type=lambda text: text.split(","), default=list(SETUPS))
    arguments = parser.parse_args()
    figures = anyio.run(run, arguments)
    print(report(figures, arguments))


if __name__ == "__main__":
    main()
