"""How close each gRPC server comes to a bare grpc.aio handler: ``python -m benchmarks.grpc_floor``.

Three servers take turns under the same client (``grpc_loadgen``), request (the tiny
model's ``ModelInferRequest``, raw contents) and model code and weights
(``bench_core.Tiny``):

- ``bare``: one grpc.aio unary handler on uvloop that parses the request, predicts and
  serialises the response with ``raw_output_contents``; no metrics, no validation, no
  statistics. No Python server on grpc.aio can cost less per call: it is the floor.
- ``v2mount`` and ``mlserver``, started as ``benchmarks.compare`` starts them.

It prints each one's server CPU time per request (the figure the shared 2-core machine
disturbs least) at each concurrency, the median of ``--reps`` runs taken in turn.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.grpc_loadgen import run_grpc
from benchmarks.servers import (
    BENCH_DIR,
    BLAS_ENV,
    MODELS_DIR,
    RunningServer,
    free_port,
    start_mlserver,
    start_v2mount,
    tree_stats,
    wait_ready,
    write_mlserver_settings,
)

__all__ = ["main"]


async def _serve_bare(port: int, weights: str) -> None:
    import bench_core  # type: ignore[import-not-found]  # on PYTHONPATH (models/)
    import grpc
    import numpy as np

    from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb

    tiny = bench_core.Tiny(weights)

    async def infer(data: bytes, context: object) -> bytes:
        request = pb.ModelInferRequest.FromString(data)
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(tensor.shape))
        y = tiny.predict(x)
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="predict", datatype="INT64", shape=list(y.shape))
        response.raw_output_contents.append(y.tobytes())
        return response.SerializeToString()

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(infer)
    server = grpc.aio.server(
        handlers=[
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": handler}
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _start_bare(weights: Path, log: Path) -> RunningServer:
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.grpc_floor", "--serve", str(port)]
    command += ["--weights", str(weights)]
    env = {**os.environ, **BLAS_ENV, "PYTHONPATH": f"{MODELS_DIR}{os.pathsep}{Path.cwd()}"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RunningServer("bare", port, process, log, grpc_port=port)


def _ready(target: str, request: Path) -> None:
    for _ in range(100):
        try:
            run_grpc(target, request, 1, 0.2, timeout_s=2.0)
            return
        except RuntimeError:
            time.sleep(0.2)
    raise RuntimeError(f"no gRPC server answered on {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--servers", default="bare,v2mount,mlserver")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mlserver-venv", type=Path, default=BENCH_DIR / ".venv-mlserver")
    args = parser.parse_args(argv)
    if args.serve is not None:
        import uvloop

        uvloop.run(_serve_bare(args.serve, str(args.weights)))
        return
    from benchmarks.compare import _load_bench_core
    from benchmarks.scenarios import all_setups, write_payloads, write_repositories

    work: Path = args.work
    weights = _load_bench_core().write_weights(work / "weights")
    request = write_payloads(work / "payloads")["tiny-grpc"].path
    setup = next(s for s in all_setups() if s.key == "grpc-tiny")
    repos = write_repositories(setup, work / "repos", weights)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    kinds = [k for k in args.servers.split(",") if k]
    levels = [int(c) for c in args.concurrency.split(",")]
    cpu: dict[tuple[str, int], list[float]] = {(k, c): [] for k in kinds for c in levels}
    servers: dict[str, RunningServer] = {}
    try:
        for kind in kinds:
            log = work / "logs" / f"grpc-floor-{kind}.log"
            if kind == "bare":
                servers[kind] = _start_bare(weights["tiny"], log)
            elif kind == "v2mount":
                servers[kind] = start_v2mount(repos["v2mount"], log=log)
                wait_ready(servers[kind], ["tiny"])
            else:
                write_mlserver_settings(repos["mlserver"], 0)
                servers[kind] = start_mlserver(
                    repos["mlserver"], args.mlserver_venv / "bin", log=log
                )
                wait_ready(servers[kind], ["tiny"])
            _ready(f"127.0.0.1:{servers[kind].grpc_port}", request)
        for rep in range(args.reps):
            for c in levels:
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    server = servers[kind]
                    target = f"127.0.0.1:{server.grpc_port}"
                    run_grpc(target, request, c, 1.0)  # warm-up
                    before = tree_stats(server.process.pid).cpu_s
                    load = run_grpc(target, request, c, args.duration)
                    used = tree_stats(server.process.pid).cpu_s - before
                    ms = 1e3 * used / max(1, load.requests)
                    cpu[(kind, c)].append(ms)
                    print(
                        f"rep {rep} c={c:<3} {kind:8} {load.rps:7.0f} req/s  server CPU "
                        f"{ms:.3f} ms/req  load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=30)
    print("\nserver CPU ms/request, median of", args.reps)
    print("c    " + "".join(f"{k:>10}" for k in kinds))
    for c in levels:
        print(f"{c:<5}" + "".join(f"{statistics.median(cpu[(k, c)]):10.3f}" for k in kinds))


if __name__ == "__main__":
    main()
