"""Metrics of a model running in a worker process (``parallel_workers: 1``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from v2mount import InferenceRequest, Model, V2App

pytestmark = pytest.mark.anyio


class InWorker(Model):
    """Records custom metrics where it runs; waits for a file when asked to."""

    name = "in-worker"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]

    def load(self) -> None:
        self.metrics.counter("in_worker_loads", documentation="Loads of the model")
        self.metrics.gauge("in_worker_pid", os.getpid(), "Process that loaded the model")

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        x = payload["x"]
        self.metrics.counter("in_worker_rows", len(x), labels={"model": "in-worker"})
        self.metrics.histogram("in_worker_batch", len(x), buckets=(1, 2, 4))
        gate = payload.parameters.get("gate")
        if isinstance(gate, str):
            for _ in range(3000):
                if Path(gate).exists():
                    break
                time.sleep(0.01)
        if payload.parameters.get("fail"):
            raise ValueError("refused on purpose")
        return {"y": x * 2}


def body(rows: int = 1, **parameters: Any) -> dict[str, Any]:
    data = np.ones((rows, 2), np.float32).tolist()
    return {
        "parameters": parameters,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": data}],
    }


async def test_custom_metrics_and_queue_from_a_worker_process(
    serve: Any, scrape: Any, tmp_path: Path
) -> None:
    app = V2App([InWorker(parallel_workers=1, max_queue_size=8)])
    handle = app.registry.get("in-worker")
    labels = {"model": "in-worker", "version": ""}
    async with serve(app) as client:
        m = await scrape(client)
        assert m.value("in_worker_loads_total") == 1
        worker_pid = m.value("in_worker_pid")
        assert worker_pid not in (0, os.getpid())  # loaded in another process
        assert not m.has("in_worker_rows_total", model="in-worker")

        for rows in (1, 2, 3):
            response = await client.post("/v2/models/in-worker/infer", json=body(rows))
            assert response.status_code == 200, response.text
        failed = await client.post("/v2/models/in-worker/infer", json=body(4, fail=True))
        assert failed.status_code == 500
        assert "refused on purpose" in failed.json()["error"]
        m = await scrape(client)
        assert m.value("model_infer_request_success_total", **labels) == 3
        assert m.value("model_infer_request_failure_total", **labels) == 1
        assert m.value("in_worker_rows_total", model="in-worker") == 10  # the failed one too
        assert m.value("in_worker_batch_bucket", le="2.0") == 2
        assert m.value("in_worker_batch_count") == 4
        assert m.value("in_worker_loads_total") == 1
        assert m.value("parallel_request_queue", **labels) == 0

        gate = tmp_path / "open"

        async def held() -> None:
            answer = await client.post("/v2/models/in-worker/infer", json=body(gate=str(gate)))
            assert answer.status_code == 200

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(held)
                with anyio.fail_after(30):
                    while (s := handle.runner_statistics()) is None or s.in_flight < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                busy = await scrape(client)
                gate.touch()
        finally:
            gate.touch()
        assert busy.value("parallel_request_queue", **labels) == 2  # one runs, two wait
        done = await scrape(client)
        assert done.value("parallel_request_queue", **labels) == 0
        assert done.value("model_infer_request_success_total", **labels) == 6
