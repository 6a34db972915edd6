"""``threads_per_worker``: what sizing each worker's native thread pool does.

Serves one compute-bound model through a real ``V2App`` and its worker pool, for each
combination of ``parallel_workers`` and ``threads_per_worker``, and drives it with
``concurrency`` closed-loop clients (each sends its next request when the last is
answered) over httpx's in-memory ASGI transport. Two models, the same maths:

- ``onnx``: an ONNX multilayer perceptron (256 -> 2048 -> 2048 -> 2048 -> 16, float32, batch
  of 64 rows) run by ``OnnxModel``: threads = ONNX Runtime's intra-op threads;
- ``blas``: the same network in numpy (``BlasMLP`` below): threads = the worker's
  OpenBLAS/OpenMP pool, sized by the pool with threadpoolctl.

``workers x threads`` above the number of cores oversubscribes them: threads of
different workers preempt each other mid-operation. That is what every worker does when
nothing limits it, since each native library sizes its pool to all cores.

    python -m benchmarks.threads            # about three minutes on 2 cores
    python -m benchmarks.threads --quick    # fewer combinations, shorter runs

It prints a Markdown table (``--json FILE`` also writes the raw figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np

from v2mount import Model, V2App
from v2mount.types import InferenceRequest

LAYERS = (256, 2048, 2048, 2048, 16)
ROWS = 64


def _weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        for n_in, n_out in itertools.pairwise(LAYERS)
    ]


class BlasMLP(Model):
    """The benchmark network in numpy: ``x[n, 256] -> y[n, 16]``, ReLU between layers."""

    name = "blas"

    def load(self) -> None:
        self.weights = _weights()

    def predict(self, payload: InferenceRequest) -> Any:
        hidden = payload["x"]
        for weights in self.weights[:-1]:
            hidden = np.maximum(hidden @ weights, 0)
        return {"y": hidden @ self.weights[-1]}


def write_onnx(path: Path) -> Path:
    """The same network as an ONNX file (needs the ``onnx`` package)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, current = [], [], "x"
    weights = _weights()
    for index, matrix in enumerate(weights):
        name = f"w{index}"
        initializers.append(numpy_helper.from_array(matrix, name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"h{index}"]))
        current = f"h{index}"
        if index < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", LAYERS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", LAYERS[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def make_model(kind: str, workers: int, threads: int, folder: Path) -> Model:
    fields: dict[str, Any] = {"parallel_workers": workers, "threads_per_worker": threads}
    if kind == "blas":
        return BlasMLP(**fields)
    from v2mount.runtimes import OnnxModel

    return OnnxModel(name="onnx", parameters={"uri": str(folder / "mlp.onnx")}, **fields)


@dataclass(frozen=True)
class Figure:
    model: str
    workers: int
    threads: int
    concurrency: int
    requests: int
    throughput: float  # requests per second
    p50_ms: float
    p99_ms: float


async def closed_loop(
    client: httpx.AsyncClient, path: str, body: bytes, concurrency: int, duration: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def one_client(stop_at: float, record: bool) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await client.post(path, content=body)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text}")
            if record:
                latencies.append(time.perf_counter() - started)

    elapsed = 0.0
    for record, seconds in ((False, min(0.5, duration)), (True, duration)):
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(one_client, started + seconds, record)
        elapsed = time.perf_counter() - started
    return elapsed, latencies


async def measure(
    kind: str, workers: int, threads: int, concurrencies: list[int], duration: float, folder: Path
) -> list[Figure]:
    model = make_model(kind, workers, threads, folder)
    features = np.random.default_rng(1).standard_normal((ROWS, LAYERS[0])).astype(np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": list(features.shape)}
    body = json.dumps({"inputs": [{**tensor, "data": features.ravel().tolist()}]}).encode()
    app = V2App([model])
    figures = []
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            ready = await client.get(f"/v2/models/{kind}/ready")
            if ready.status_code != 200:
                raise RuntimeError(ready.text)
            for concurrency in concurrencies:
                elapsed, latencies = await closed_loop(
                    client, f"/v2/models/{kind}/infer", body, concurrency, duration
                )
                ordered = sorted(latencies)
                figures.append(
                    Figure(
                        model=kind,
                        workers=workers,
                        threads=threads,
                        concurrency=concurrency,
                        requests=len(ordered),
                        throughput=len(ordered) / elapsed,
                        p50_ms=1000 * ordered[len(ordered) // 2],
                        p99_ms=1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                    )
                )
    return figures


def report(figures: list[Figure]) -> str:
    lines = [
        f"`python -m benchmarks.threads` on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {ROWS} rows x {' -> '.join(map(str, LAYERS))} float32 "
        "per request.",
        "",
        "| model | workers x threads | clients | req/s | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for f in figures:
        lines.append(
            f"| {f.model} | {f.workers} x {f.threads} | {f.concurrency} | {f.throughput:.1f} "
            f"| {f.p50_ms:.1f} | {f.p99_ms:.1f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Figure]:
    """Every combination, ``--rounds`` times interleaved; the best round of each is kept.

    Interleaving and keeping the best round filters out other processes that happen to
    run on the machine meanwhile (they can only make a round slower).
    """
    cores = os.cpu_count() or 2
    grid = [(1, 1), (1, cores), (cores, 1), (cores, cores)]
    if args.quick:
        grid = [(cores, 1), (cores, cores)]
    concurrencies = [1, 2 * cores]
    best: dict[tuple[str, int, int, int], Figure] = {}
    with tempfile.TemporaryDirectory() as folder:
        if "onnx" in args.models:
            write_onnx(Path(folder) / "mlp.onnx")
        for _ in range(args.rounds):
            for kind in args.models:
                for workers, threads in grid:
                    for figure in await measure(
                        kind, workers, threads, concurrencies, args.duration, Path(folder)
                    ):
                        key = (kind, workers, threads, figure.concurrency)
                        if key not in best or figure.throughput > best[key].throughput:
                            best[key] = figure
    return list(best.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer combinations, 1 s runs")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--models", nargs="+", default=["onnx", "blas"], choices=["onnx", "blas"])
    parser.add_argument("--rounds", type=int, default=3, help="keep the best of N rounds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = min(args.duration, 1.0), 1
    load = os.getloadavg()[0]
    figures = anyio.run(run, args)
    print(report(figures))
    print(
        f"\nBest of {args.rounds} round(s); load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))


if __name__ == "__main__":
    main()
