"""A ``batching`` block through a real ``V2App``: in-process and with a worker pool."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support import eventually, scrape_metrics
from v2mount import InferenceRequest, Model, ModelSettings, V2App
from v2mount.errors import SettingsError
from v2mount.settings import load_model_settings

pytestmark = pytest.mark.anyio

INFER = "/v2/models/gated/infer"
LABELS = {"model": "gated", "version": ""}


class Gated(Model):
    """Doubles ``x``; holds each call until ``gate`` is set (in process) or until the
    file named by the request parameter ``gate_file`` exists (in a worker)."""

    name = "gated"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self.gate = threading.Event()
        self.calls: list[int] = []

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        x = payload["x"]
        self.calls.append(len(x))
        self.metrics.histogram("gated_rows", len(x), buckets=(1, 2, 4, 8))
        gate_file = payload.parameters.get("gate_file")
        if gate_file:
            deadline = time.monotonic() + 30
            while not Path(gate_file).exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        elif not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return {"y": x * 2}


def body(value: float, **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [value]}],
        "parameters": parameters,
    }


def metric(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset({**LABELS, **labels}.items())), 0.0)


#: Waits for state the batcher or the model's thread changes.
until = functools.partial(eventually, seconds=20.0, interval=0.005)


async def test_requests_wait_for_the_busy_worker_and_go_as_one_batch(serve: Any) -> None:
    model = Gated(max_batch_size=8, batching={"slo_ms": 10_000}, max_queue_size=4)
    app = V2App([model], model_parallel_workers=0)
    handle = app.registry.get("gated")
    answers: dict[int, httpx.Response] = {}

    async def post(client: httpx.AsyncClient, value: int) -> None:
        answers[value] = await client.post(INFER, json=body(value))

    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(post, client, 1)
            await until(lambda: model.calls == [1])  # cold: it went at once
            for value in (2, 3, 4, 5):
                group.start_soon(post, client, value)
            await until(lambda: (s := handle.batcher_statistics()) and s.queued_requests == 4)
            # The batcher holds at most max_queue_size requests: the next is refused.
            refused = await client.post(INFER, json=body(6))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json() == {"error": "4 requests are waiting to be batched"}
            model.gate.set()
        samples = await scrape_metrics(client)
    assert model.calls == [1, 4]
    for value in (1, 2, 3, 4, 5):
        assert answers[value].status_code == 200, answers[value].text
        assert answers[value].json()["outputs"][0]["data"] == [2.0 * value]
    assert metric(samples, "model_infer_batch_dispatch_total", reason="idle") == 2
    assert metric(samples, "model_infer_batch_dispatch_total", reason="full") == 0
    assert metric(samples, "model_infer_batch_refused_total") == 1
    assert metric(samples, "model_infer_batch_slo_miss_total") == 0
    assert metric(samples, "model_infer_batch_queue_delay_seconds_count") == 5
    assert metric(samples, "model_infer_batch_size_sum") == 5
    # Two batches are not enough to fit a cost: no gauge yet.
    assert not any(name == "model_infer_batch_cost_intercept_seconds" for name, _ in samples)


async def test_the_plain_window_reports_no_predictive_figures(serve: Any) -> None:
    model = Gated(max_batch_size=2, max_batch_time=60)
    model.gate.set()
    app = V2App([model], model_parallel_workers=0)
    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            for value in (1, 2):
                group.start_soon(functools.partial(client.post, INFER, json=body(value)))
        samples = await scrape_metrics(client)
    assert model.calls == [2]
    assert metric(samples, "model_infer_batch_size_sum") == 2
    assert not any(name.startswith("model_infer_batch_dispatch") for name, _ in samples)
    assert metric(samples, "model_infer_batch_queue_delay_seconds_count") == 0


@pytest.mark.slow
async def test_through_a_pool_one_batch_per_worker_and_the_rest_wait(
    serve: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    app = V2App([Gated(max_batch_size=8, batching={"slo_ms": 10_000}, parallel_workers=2)])
    handle = app.registry.get("gated")
    answers: list[httpx.Response] = []

    async def post(client: httpx.AsyncClient, value: int) -> None:
        answers.append(await client.post(INFER, json=body(value, gate_file=str(gate))))

    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            for value in (1, 2):
                group.start_soon(post, client, value)
            await until(lambda: (s := handle.runner_statistics()) and s.in_flight == 2)
            for value in (3, 4, 5, 6):
                group.start_soon(post, client, value)
            await until(lambda: (s := handle.batcher_statistics()) and s.queued_requests == 4)
            runner = handle.runner_statistics()
            assert runner is not None and runner.queued == 0  # they wait in the batcher
            gate.touch()
        samples = await scrape_metrics(client)
    assert sorted(a.json()["outputs"][0]["data"][0] for a in answers) == [2, 4, 6, 8, 10, 12]
    assert metric(samples, "model_infer_batch_size_count") == 3
    assert samples[("gated_rows_bucket", frozenset({"le": "1.0"}.items()))] == 2
    assert samples[("gated_rows_sum", frozenset())] == 6


def test_the_batching_block_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "model-settings.json"
    path.write_text(json.dumps({"name": "m", "max_batch_size": 8, "batching": {"slo": 50}}))
    with pytest.raises(SettingsError, match=r"batching\.slo: Extra inputs are not permitted"):
        load_model_settings(path)
    path.write_text(json.dumps({"name": "m", "max_batch_size": 8, "batching": {"slo_ms": 0}}))
    with pytest.raises(SettingsError, match=r"batching\.slo_ms: Input should be greater than 0"):
        load_model_settings(path)
    path.write_text(json.dumps({"name": "m", "max_batch_size": 1, "batching": {}}))
    with pytest.raises(SettingsError, match="a batching block needs max_batch_size > 1"):
        load_model_settings(path)
    path.write_text(
        json.dumps({"name": "m", "max_batch_size": 8, "batching": {"slo_ms": 50, "window": 4}})
    )
    loaded = load_model_settings(path)
    assert loaded.batching is not None
    assert (loaded.batching.slo_ms, loaded.batching.window, loaded.batching.admission) == (
        50,
        4,
        True,
    )
    assert ModelSettings(name="m").batching is None
