"""Closed-loop HTTP load generators: ``wrk`` (C, preferred) and a small asyncio client.

Both keep a fixed number of keep-alive connections busy for a fixed duration, each
connection sending the same request again as soon as the previous answer is in, and
report the same ``LoadResult``. Both run as a *separate process* so that their CPU time
can be measured (``getrusage`` of the reaped child) and reported next to the server's:
on a 2-core machine the load generator competes with the server for the same cores.

The asyncio client is the fallback where ``wrk`` cannot be installed; it costs several
times more CPU per request than ``wrk`` (see ``docs/performance.md``), so prefer ``wrk``.
Run it alone with ``python -m benchmarks.loadgen URL --body FILE -c 16 -d 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoadResult", "find_wrk", "run_load", "run_python_client", "run_wrk", "summarise"]


@dataclass(frozen=True)
class LoadResult:
    """What one fixed-concurrency, fixed-duration run measured.

    ``errors`` counts failed requests: non-2xx answers, socket errors and time-outs.
    ``loadgen_cpu_s`` is the user + system CPU time the load generator process used.
    """

    tool: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    loadgen_cpu_s: float
    error_detail: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rps": self.rps}


_WRK_SCRIPT = """
wrk.method = "POST"
local body_file = assert(io.open(%(body)s, "rb"))
wrk.body = body_file:read("*a")
body_file:close()
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(%(out)s, "w"))
  out:write(string.format(
    '{"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, '
    .. '"status": %%d, "timeout": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "mean": %%f}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
  out:close()
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def find_wrk() -> str | None:
    """Path of the ``wrk`` executable, or ``None``."""
    return shutil.which("wrk")


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    url: str,
    body: Path,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
    *,
    timeout_s: float = 30.0,
    wrk: str = "wrk",
) -> LoadResult:
    """Run ``wrk -t1`` (one thread: one core at most) and parse what its Lua hook wrote.

    Blocks the calling thread for ``duration_s`` plus the answer of the last requests.
    Call it only while no other child of this process can exit, or the CPU time of that
    child is counted too.
    """
    with tempfile.TemporaryDirectory(prefix="v2mount-wrk-") as tmp:
        out = Path(tmp) / "result.json"
        script = Path(tmp) / "post.lua"
        header_lines = "\n".join(
            f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()
        )
        script.write_text(
            _WRK_SCRIPT
            % {
                "body": _lua_string(str(body)),
                "out": _lua_string(str(out)),
                "headers": header_lines,
            }
        )
        command = [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
        ]
        cpu_before = _child_cpu()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        cpu = _child_cpu() - cpu_before
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        raw = json.loads(out.read_text())
    detail = {key: int(raw[key]) for key in ("connect", "read", "write", "status", "timeout")}
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=raw["duration_us"] / 1e6,
        requests=int(raw["requests"]),
        errors=sum(detail.values()),
        p50_ms=raw["p50"] / 1e3,
        p90_ms=raw["p90"] / 1e3,
        p99_ms=raw["p99"] / 1e3,
        mean_ms=raw["mean"] / 1e3,
        loadgen_cpu_s=cpu,
        error_detail={k: v for k, v in detail.items() if v},
    )


def run_python_client(
    url: str,
    body: Path,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
    *,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Run the asyncio client in a child process (same contract as ``run_wrk``)."""
    command = [sys.executable, "-m", "benchmarks.loadgen", url, "--body", str(body)]
    command += ["-c", str(concurrency), "-d", str(duration_s), "--timeout", str(timeout_s)]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    cpu_before = _child_cpu()
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    cpu = _child_cpu() - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}): {done.stderr}")
    raw = json.loads(done.stdout)
    raw["loadgen_cpu_s"] = cpu
    raw.pop("rps", None)
    return LoadResult(**raw)


def run_load(
    tool: str,
    url: str,
    body: Path,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
    *,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Dispatch to ``run_wrk`` (``tool`` is a path to wrk) or the asyncio client (``"python"``)."""
    if tool == "python":
        return run_python_client(url, body, headers, concurrency, duration_s, timeout_s=timeout_s)
    return run_wrk(url, body, headers, concurrency, duration_s, timeout_s=timeout_s, wrk=tool)


# --- the asyncio client (runs in the child process) -------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _connection(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    timeout_s: float,
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            try:
                status = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
                errors["read"] = errors.get("read", 0) + 1
                return
            if status >= 300:
                errors["status"] = errors.get("status", 0) + 1
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _drive(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
    timeout_s: float,
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{key}: {value}" for key, value in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + duration_s
    await asyncio.gather(
        *(
            _connection(host, port, request, deadline, timeout_s, latencies, errors)
            for _ in range(concurrency)
        )
    )
    elapsed = time.perf_counter() - start
    return summarise("python", concurrency, elapsed, latencies, errors)


def summarise(
    tool: str, concurrency: int, elapsed: float, latencies: list[float], errors: dict[str, int]
) -> dict[str, object]:
    """A Python client's run as ``LoadResult`` fields (its CPU is measured by the parent)."""
    import numpy as np

    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {
        "tool": tool,
        "concurrency": concurrency,
        "duration_s": elapsed,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": float(ms.mean()),
        "loadgen_cpu_s": 0.0,
        "error_detail": errors,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI of the asyncio client: prints one JSON ``LoadResult`` on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    try:
        import uvloop

        run: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        run = asyncio.run
    result = run(
        _drive(
            args.url,
            args.body.read_bytes(),
            headers,
            args.concurrency,
            args.duration,
            args.timeout,
        )
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
