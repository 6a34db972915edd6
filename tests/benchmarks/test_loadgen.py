"""Smoke test of the benchmark load generators (and connect_burst's client) against a
tiny local HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.connect_burst import burst
from benchmarks.loadgen import find_wrk, run_load


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if self.path == "/fail" else 200
        body = b'{"outputs": []}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


TOOLS = ["python", *([found] if (found := find_wrk()) else [])]


@pytest.mark.parametrize("tool", TOOLS)
def test_counts_requests_and_latencies(tool: str, port: int, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"inputs": []}')
    result = run_load(tool, f"http://127.0.0.1:{port}/ok", body, {}, 2, 1.0)
    assert result.concurrency == 2
    assert result.requests > 10
    assert result.errors == 0
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.rps == pytest.approx(result.requests / result.duration_s)
    assert result.loadgen_cpu_s > 0


def test_counts_error_statuses(port: int, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b"{}")
    result = run_load(TOOLS[-1], f"http://127.0.0.1:{port}/fail", body, {}, 1, 1.0)
    assert result.requests > 0
    assert result.errors == result.requests
    assert result.error_detail == {"status": result.requests}


def test_connect_burst_times_each_connections_first_request(port: int) -> None:
    result = burst(port, "/ok", b'{"inputs": []}', 8, 0.5)
    assert len(result.first) == 8  # one first request per connection
    assert len(result.every) > 8
    assert all(latency > 0 for latency in result.every)
    assert set(result.first) <= set(result.every)


def test_connect_burst_fails_loud_on_an_error_answer(port: int) -> None:
    with pytest.raises(RuntimeError, match="500"):
        burst(port, "/fail", b"{}", 2, 0.2)
