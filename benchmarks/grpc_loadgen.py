"""A closed-loop gRPC load generator for ``ModelInfer`` (grpc.aio, one HTTP/2 connection).

``concurrency`` tasks share one channel, as ``ghz`` does by default, each sending the same
pre-serialised ``ModelInferRequest`` again as soon as the previous answer is in, for a
fixed duration. It runs as a child process so that its CPU time is measured
(``getrusage``) and reported next to the server's, and returns the HTTP load
generators' ``LoadResult``. Alone:
``python -m benchmarks.grpc_loadgen 127.0.0.1:8081 --request FILE -c 16 -d 5``.

It is Python (grpcio's C core plus an asyncio loop): it costs more CPU per request than
``wrk`` does for HTTP (``ghz`` is not packaged for apt or pip), and the figures say how
much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.loadgen import LoadResult, _child_cpu, summarise

__all__ = ["METHOD", "run_grpc"]

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def run_grpc(
    target: str, request: Path, concurrency: int, duration_s: float, *, timeout_s: float = 30.0
) -> LoadResult:
    """Run the client in a child process; blocks for about ``duration_s``."""
    command = [sys.executable, "-m", "benchmarks.grpc_loadgen", target, "--request", str(request)]
    command += ["-c", str(concurrency), "-d", str(duration_s), "--timeout", str(timeout_s)]
    cpu_before = _child_cpu()
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    cpu = _child_cpu() - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"gRPC load client failed ({done.returncode}): {done.stderr}")
    raw = json.loads(done.stdout)
    raw["loadgen_cpu_s"] = cpu
    return LoadResult(**raw)


async def _drive(
    target: str, request: bytes, concurrency: int, duration_s: float, timeout_s: float
) -> dict[str, object]:
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(METHOD)
        await call(request, timeout=timeout_s)  # connect before the clock starts
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    await call(request, timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    key = exc.code().name
                    errors[key] = errors.get(key, 0) + 1
                    continue
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return summarise("grpc-python", concurrency, elapsed, latencies, errors)


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON ``LoadResult`` on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("--request", type=Path, required=True, help="a serialised request")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    body = args.request.read_bytes()
    result = asyncio.run(_drive(args.target, body, args.concurrency, args.duration, args.timeout))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
