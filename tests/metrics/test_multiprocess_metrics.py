"""Several uvicorn workers with prometheus-client's multiprocess mode: any worker's
``/metrics`` answers for all of them.

Multiprocess mode is process-global (``PROMETHEUS_MULTIPROC_DIR`` must be set before
``prometheus_client`` is imported), so the server runs in a subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.support import metric_values, uvicorn

HERE = Path(__file__).parent
REQUESTS = 20


def fresh_get(url: str) -> httpx.Response:
    """A request on a new connection, so the kernel may hand it to either worker."""
    with httpx.Client() as client:
        return client.get(url)


def ready(address: str) -> bool:
    return fresh_get(f"http://{address}/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_every_worker_reports_the_total(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    args = ["--factory", "multiproc_server:create", "--app-dir", str(HERE), "--workers", "2"]
    with uvicorn(args, tmp_path / "uvicorn.log", ready, within=60, env=env) as address:
        base = f"http://{address}"
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        for _ in range(REQUESTS):
            with httpx.Client() as client:
                assert client.post(base + "/v2/models/doubler/infer", json=body).status_code == 200
        scrapes = [metric_values(fresh_get(base + "/metrics").text) for _ in range(4)]
    model = frozenset({("model", "doubler"), ("version", "")})
    infer = frozenset(
        {("method", "POST"), ("path", "/v2/models/{name}/infer"), ("status_code", "200")}
    )
    for scraped in scrapes:
        assert scraped[("model_infer_request_success_total", model)] == REQUESTS
        assert scraped[("rest_server_requests_total", infer)] == REQUESTS
        assert scraped[("rest_server_requests_duration_seconds_count", infer)] == REQUESTS
        assert scraped[("rows_served_total", frozenset())] == REQUESTS
        assert ("parallel_request_queue", model) in scraped  # the answering worker's queue
        # a custom gauge is kept per worker: one series per process that served
        seen = [dict(labels) for name, labels in scraped if name == "worker_seen"]
        assert seen and all(set(labels) == {"pid"} for labels in seen)
    assert list(directory.glob("counter_*.db"))
