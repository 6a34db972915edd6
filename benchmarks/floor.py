"""How close each server comes to a bare handler: ``python -m benchmarks.floor``.

Three servers take turns under the same load generator, request (the tiny model's, as
JSON over REST with ``--protocol rest``, raw contents over gRPC with ``--protocol
grpc``) and model code and weights (``bench_core.Tiny``):

- ``bare``: one handler that parses the request, predicts and serialises the answer;
  no routing, metrics, validation or statistics. REST: a raw ASGI callable under the
  same uvicorn (httptools, uvloop) as the others, answering the fields v2mount answers;
  gRPC: one grpc.aio unary handler on uvloop answering ``raw_output_contents``. No
  Python server on that stack can cost less per call: it is the floor.
- ``v2mount`` and ``mlserver``, started as ``benchmarks.compare`` starts them.

It prints each one's server CPU time per request (the figure the shared 2-core machine
disturbs least) at each concurrency, the median of ``--reps`` runs taken in turn, and
each one's ratio to MLServer.
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
from typing import Any

from benchmarks.grpc_loadgen import run_grpc
from benchmarks.loadgen import find_wrk, run_load
from benchmarks.scenarios import Payload
from benchmarks.servers import (
    BENCH_DIR,
    BLAS_ENV,
    MODELS_DIR,
    RunningServer,
    ensure_mlserver_venv,
    free_port,
    start_mlserver,
    start_v2mount,
    tree_stats,
    wait_ready,
    write_mlserver_settings,
)

__all__ = ["main"]


async def _serve_bare_grpc(port: int, weights: str) -> None:
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


async def _serve_bare_rest(port: int, weights: str) -> None:
    import itertools

    import bench_core  # type: ignore[import-not-found]  # on PYTHONPATH (models/)
    import numpy as np
    import orjson
    import uvicorn

    tiny = bench_core.Tiny(weights)
    ids = itertools.count()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        tensor = orjson.loads(body)["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        y = tiny.predict(x)
        output = {"name": "predict", "datatype": "INT64", "shape": list(y.shape)}
        answer = orjson.dumps(
            {"model_name": "tiny", "id": str(next(ids)), "outputs": [output | {"data": y.tolist()}]}
        )
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(answer)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    config = uvicorn.Config(
        app, port=port, http="httptools", loop="none", access_log=False, log_level="warning"
    )
    await uvicorn.Server(config).serve()


def _start_bare(protocol: str, weights: Path, log: Path) -> RunningServer:
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.floor", "--serve", str(port)]
    command += ["--protocol", protocol, "--weights", str(weights)]
    env = {**os.environ, **BLAS_ENV, "PYTHONPATH": f"{MODELS_DIR}{os.pathsep}{Path.cwd()}"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RunningServer("bare", port, process, log, grpc_port=port)


def _load(protocol: str, server: RunningServer, payload: Payload, c: int, seconds: float) -> int:
    """Requests answered in one run of ``seconds`` at concurrency ``c``."""
    if protocol == "grpc":
        load = run_grpc(f"127.0.0.1:{server.grpc_port}", payload.path, c, seconds)
    else:
        url = f"http://127.0.0.1:{server.port}/v2/models/tiny/infer"
        load = run_load("wrk", url, payload.path, payload.headers, c, seconds)
    if load.errors:
        raise RuntimeError(f"{server.kind}: {load.errors} failed requests; see {server.log}")
    return load.requests


def _ready(protocol: str, server: RunningServer, payload: Payload) -> None:
    for _ in range(100):
        try:
            _load(protocol, server, payload, 1, 0.2)
            return
        except (RuntimeError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"{server.kind} did not answer; see {server.log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--servers", default="bare,v2mount,mlserver")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mlserver-venv", type=Path, default=BENCH_DIR / ".venv-mlserver")
    args = parser.parse_args(argv)
    if args.serve is not None:
        import uvloop

        serve = _serve_bare_grpc if args.protocol == "grpc" else _serve_bare_rest
        uvloop.run(serve(args.serve, str(args.weights)))
        return
    if args.protocol == "rest" and find_wrk() is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    from benchmarks.compare import _load_bench_core
    from benchmarks.scenarios import all_setups, write_payloads, write_repositories

    work: Path = args.work
    weights = _load_bench_core().write_weights(work / "weights")
    rest = args.protocol == "rest"
    payload = write_payloads(work / "payloads")["tiny" if rest else "tiny-grpc"]
    setup = next(s for s in all_setups() if s.key == ("tiny-pw0" if rest else "grpc-tiny"))
    repos = write_repositories(setup, work / "repos", weights)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    mlserver_bin = ensure_mlserver_venv(args.mlserver_venv, log=work / "logs" / "pip.log")
    kinds = [k for k in args.servers.split(",") if k]
    levels = [int(c) for c in args.concurrency.split(",")]
    cpu: dict[tuple[str, int], list[float]] = {(k, c): [] for k in kinds for c in levels}
    servers: dict[str, RunningServer] = {}
    try:
        for kind in kinds:
            log = work / "logs" / f"floor-{args.protocol}-{kind}.log"
            if kind == "bare":
                servers[kind] = _start_bare(args.protocol, weights["tiny"], log)
            elif kind == "v2mount":
                servers[kind] = start_v2mount(repos["v2mount"], log=log)
                wait_ready(servers[kind], ["tiny"])
            else:
                write_mlserver_settings(repos["mlserver"], 0)
                servers[kind] = start_mlserver(repos["mlserver"], mlserver_bin, log=log)
                wait_ready(servers[kind], ["tiny"])
            _ready(args.protocol, servers[kind], payload)
        for rep in range(args.reps):
            for c in levels:
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    server = servers[kind]
                    _load(args.protocol, server, payload, c, 1.0)  # warm-up
                    before = tree_stats(server.process.pid).cpu_s
                    requests = _load(args.protocol, server, payload, c, args.duration)
                    used = tree_stats(server.process.pid).cpu_s - before
                    ms = 1e3 * used / max(1, requests)
                    cpu[(kind, c)].append(ms)
                    print(
                        f"rep {rep} c={c:<3} {kind:8} {requests / args.duration:7.0f} req/s  "
                        "server CPU "
                        f"{ms:.3f} ms/req  load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=30)
    print(f"\n{args.protocol}: server CPU ms/request, median of {args.reps}")
    print("c    " + "".join(f"{k:>10}" for k in kinds))
    for c in levels:
        print(f"{c:<5}" + "".join(f"{statistics.median(cpu[(k, c)]):10.3f}" for k in kinds))
    if "mlserver" in kinds:
        print("MLServer's CPU per request over each one's (the ratio a server can reach):")
        for c in levels:
            base = statistics.median(cpu[("mlserver", c)])
            ratios = (base / statistics.median(cpu[(k, c)]) for k in kinds)
            print(f"{c:<5}" + "".join(f"{r:9.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
