"""Many clients connecting at once to a busy server: ``python -m benchmarks.connect_burst``.

A closed-loop client opens ``--connections`` keep-alive connections at the same moment
and sends each one's first request as soon as the connection is up (as ``wrk`` does),
then keeps every connection busy for ``--duration`` seconds. It reports how long the
*first* request of each connection took (the last to be let in waits longest) beside
the p50 / p99 of all requests, for each server in turn (the tiny model in-process, as
``benchmarks.compare`` starts them).

Why: uvloop's libuv (≥ 1.45) accepts one connection per turn of the event loop. A server
whose turns are long (many predicts run on the loop per turn) lets a burst of clients in
one turn apiece. ``wrk`` then corrects for coordinated omission: each slow first request
also counts as the requests its connection would have sent meanwhile, so the burst can
set its p99 (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.servers import (
    BENCH_DIR,
    RunningServer,
    ensure_mlserver_venv,
    start_mlserver,
    start_v2mount,
    wait_ready,
    write_mlserver_settings,
)

__all__ = ["Burst", "burst", "main"]


@dataclass(frozen=True)
class Burst:
    """Latencies in seconds: each connection's first request, and every request."""

    first: list[float]
    every: list[float]


def _request(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _answer_length(buffer: bytes) -> int | None:
    """Bytes of the first whole answer in ``buffer``, or ``None`` while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    for line in buffer[:end].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            total = end + 4 + int(value)
            return total if len(buffer) >= total else None
    raise RuntimeError("an answer without Content-Length")


def burst(port: int, path: str, body: bytes, connections: int, duration: float) -> Burst:
    """Open ``connections`` at once, keep them busy ``duration`` s; see the module docstring."""
    request = _request(path, body)
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytes] = {}
    first: list[float] = []
    every: list[float] = []
    answered: set[socket.socket] = set()
    for _ in range(connections):
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)
        buffers[sock] = b""
    end = time.perf_counter() + duration
    try:
        while selector.get_map():
            for key, events in selector.select(timeout=30):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:  # connected: its first request
                    selector.modify(sock, selectors.EVENT_READ)
                    sent[sock] = time.perf_counter()
                    sock.sendall(request)
                    continue
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed a connection")
                buffers[sock] += data
                length = _answer_length(buffers[sock])
                if length is None:
                    continue
                if not buffers[sock].startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"answer: {buffers[sock][:200]!r}")
                now = time.perf_counter()
                latency = now - sent[sock]
                every.append(latency)
                if sock not in answered:
                    answered.add(sock)
                    first.append(latency)
                buffers[sock] = buffers[sock][length:]
                if now < end:
                    sent[sock] = time.perf_counter()
                    sock.sendall(request)
                else:
                    selector.unregister(sock)
    finally:
        for sock in buffers:
            sock.close()
        selector.close()
    return Burst(first, every)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--servers", default="v2mount,mlserver")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mlserver-venv", type=Path, default=BENCH_DIR / ".venv-mlserver")
    args = parser.parse_args(argv)
    from benchmarks.compare import _load_bench_core
    from benchmarks.scenarios import all_setups, write_payloads, write_repositories

    work: Path = args.work
    weights = _load_bench_core().write_weights(work / "weights")
    body = write_payloads(work / "payloads")["tiny"].path.read_bytes()
    setup = next(s for s in all_setups() if s.key == "tiny-pw0")
    repos = write_repositories(setup, work / "repos", weights)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    mlserver_bin = ensure_mlserver_venv(args.mlserver_venv, log=work / "logs" / "pip.log")
    for kind in [k for k in args.servers.split(",") if k]:
        log = work / "logs" / f"connect-burst-{kind}.log"
        server: RunningServer
        if kind == "v2mount":
            server = start_v2mount(repos["v2mount"], log=log)
        else:
            write_mlserver_settings(repos["mlserver"], 0)
            server = start_mlserver(repos["mlserver"], mlserver_bin, log=log)
        try:
            wait_ready(server, ["tiny"])
            path = "/v2/models/tiny/infer"
            burst(server.port, path, body, 8, 1.0)  # warm-up: the inline policy settles
            for rep in range(args.reps):
                result = burst(server.port, path, body, args.connections, args.duration)
                ms = [1e3 * v for v in result.every]
                first = [1e3 * v for v in result.first]
                print(
                    f"{kind:8} rep {rep}: {len(ms) / args.duration:6.0f} req/s  all p50 "
                    f"{statistics.median(ms):6.1f} p99 {_quantile(ms, 0.99):6.1f} ms  first "
                    f"request of each connection p50 {statistics.median(first):6.1f} max "
                    f"{max(first):6.1f} ms",
                    flush=True,
                )
        finally:
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=30)


if __name__ == "__main__":
    main()
