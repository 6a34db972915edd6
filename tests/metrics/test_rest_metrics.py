"""Metric values move by exactly what requests do, read back from ``/metrics``."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.support import eventually
from v2mount import InferenceRequest, Model, V2App, V2Middleware
from v2mount.errors import SettingsError
from v2mount.metrics import metrics_endpoint
from v2mount.rest.metrics import UNMATCHED

pytestmark = pytest.mark.anyio

INFER = "/v2/models/{name}/infer"


class Doubler(Model):
    name = "doubler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def load(self) -> None:
        self.metrics.gauge("doubler_loaded", 1, "Set once the weights are in")

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        x = payload["x"]
        self.metrics.counter("doubler_rows", len(x), labels={"kind": "x"})
        self.metrics.histogram("doubler_batch", len(x), buckets=(1, 2, 4))
        return {"y": x * 2}


class Failing(Model):
    name = "failing"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        raise RuntimeError("broken on purpose")


class Gate(Model):
    """``async`` predict that waits until the test opens the gate."""

    name = "gate"

    def load(self) -> None:
        self.gate = anyio.Event()

    async def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        await self.gate.wait()
        return {"y": payload["x"]}


class Blocking(Model):
    """Plain predict (one thread at a time) that blocks until the test releases it."""

    name = "blocking"

    def load(self) -> None:
        self.release = threading.Event()

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.release.wait(30)
        return {"y": payload["x"]}


def body(rows: int = 1) -> dict[str, Any]:
    data = np.arange(rows * 2, dtype=np.float32).tolist()
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": data}]}


def make_app(**overrides: Any) -> V2App:
    return V2App([Doubler(), Failing()], model_parallel_workers=0, **overrides)


async def post(client: httpx.AsyncClient, model: str, rows: int = 1) -> None:
    response = await client.post(f"/v2/models/{model}/infer", json=body(rows))
    assert response.status_code == 200, response.text


#: Yields to the loop until ``condition()`` holds (bounded, no timing asserted).
until = partial(eventually, seconds=60.0, interval=0.005)


async def test_inference_and_rest_counters_move_by_exact_amounts(serve: Any, scrape: Any) -> None:
    async with serve(make_app()) as client:
        for _ in range(3):
            assert (await client.post("/v2/models/doubler/infer", json=body())).status_code == 200
        for _ in range(2):
            assert (await client.post("/v2/models/failing/infer", json=body())).status_code == 500
        bad = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}
        assert (await client.post("/v2/models/doubler/infer", json=bad)).status_code == 400
        assert (await client.get("/v2/models/missing")).status_code == 404
        assert (await client.get("/v2/models/doubler/infer")).status_code == 405
        assert (await client.get("/no/such/route")).status_code == 404

        m = await scrape(client)
        assert m.value("model_infer_request_success_total", model="doubler", version="") == 3
        assert m.value("model_infer_request_failure_total", model="failing", version="") == 2
        assert m.value("model_infer_request_success_total", model="failing", version="") == 0
        duration = "model_infer_request_duration_seconds_count"
        assert m.value(duration, model="doubler", version="") == 3

        def rest(name: str, method: str, path: str, status: int) -> float:
            return m.value(name, method=method, path=path, status_code=str(status))

        for name in ("rest_server_requests_total", "rest_server_requests_duration_seconds_count"):
            assert rest(name, "POST", INFER, 200) == 3
            assert rest(name, "POST", INFER, 500) == 2
            assert rest(name, "POST", INFER, 400) == 1
            assert rest(name, "GET", "/v2/models/{name}", 404) == 1
            assert rest(name, "GET", INFER, 405) == 1
            assert rest(name, "GET", UNMATCHED, 404) == 1
        paths = {labels["path"] for labels in m.labels("rest_server_requests_total")}
        assert paths == {INFER, "/v2/models/{name}", UNMATCHED}  # the scrape is counted after
        assert m.value("rest_server_requests_in_progress", method="GET", path="/metrics") == 1

        again = await scrape(client)
        assert (
            again.value(
                "rest_server_requests_total", method="GET", path="/metrics", status_code="200"
            )
            == 1
        )
        assert again.value("rest_server_requests_in_progress", method="POST", path=INFER) == 0


async def test_custom_metrics_recorded_in_process(serve: Any, scrape: Any) -> None:
    async with serve(make_app()) as client:
        m = await scrape(client)
        assert m.value("doubler_loaded") == 1
        assert not m.has("doubler_rows_total", kind="x")
        await client.post("/v2/models/doubler/infer", json=body(3))
        await client.post("/v2/models/doubler/infer", json=body(1))
        m = await scrape(client)
        assert m.value("doubler_rows_total", kind="x") == 4
        assert m.value("doubler_batch_bucket", le="1.0") == 1
        assert m.value("doubler_batch_bucket", le="4.0") == 2
        assert m.value("doubler_batch_count") == 2


async def test_in_progress_gauge_counts_requests_in_flight(serve: Any, scrape: Any) -> None:
    gate = Gate()
    async with serve(V2App([gate], model_parallel_workers=0)) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, client, "gate")
            tg.start_soon(post, client, "gate")
            await until(lambda: _in_progress(client) == 2)
            gate_metrics = await scrape(client)
            gate.gate.set()
        in_progress = (await scrape(client)).value(
            "rest_server_requests_in_progress", method="POST", path=INFER
        )
    assert gate_metrics.value("rest_server_requests_in_progress", method="POST", path=INFER) == 2
    assert in_progress == 0


def _in_progress(client: httpx.AsyncClient) -> float:
    app = client._transport.app  # type: ignore[attr-defined]
    value = app.metrics.registry.get_sample_value(
        "rest_server_requests_in_progress", {"method": "POST", "path": INFER}
    )
    return float(value or 0)


async def test_parallel_request_queue_counts_waiting_requests(serve: Any, scrape: Any) -> None:
    model = Blocking()
    app = V2App([model], model_parallel_workers=0)
    handle = app.registry.get("blocking")
    async with serve(app) as client:
        idle = await scrape(client)
        assert idle.value("parallel_request_queue", model="blocking", version="") == 0
        assert not idle.has("batch_request_queue", model="blocking", version="")
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(post, client, "blocking")
                await until(
                    lambda: (s := handle.runner_statistics()) is not None and s.in_flight == 3
                )
                busy = await scrape(client)
                model.release.set()
        finally:
            model.release.set()
        assert busy.value("parallel_request_queue", model="blocking", version="") == 2
        done = await scrape(client)
        assert done.value("parallel_request_queue", model="blocking", version="") == 0
        assert done.value("model_infer_request_success_total", model="blocking", version="") == 3


async def test_batch_queue_and_batch_size(serve: Any, scrape: Any) -> None:
    app = V2App([Doubler(max_batch_size=4, max_batch_time=60)], model_parallel_workers=0)
    handle = app.registry.get("doubler")
    async with serve(app) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(post, client, "doubler")
            await until(
                lambda: (s := handle.batcher_statistics()) is not None and s.queued_requests == 3
            )
            waiting = await scrape(client)
            tg.start_soon(post, client, "doubler")  # the fourth row fills the batch
        done = await scrape(client)
    assert waiting.value("batch_request_queue", model="doubler", version="") == 3
    assert done.value("batch_request_queue", model="doubler", version="") == 0
    assert done.value("model_infer_batch_size_count", model="doubler", version="") == 1
    assert done.value("model_infer_batch_size_sum", model="doubler", version="") == 4
    assert done.value("model_infer_request_success_total", model="doubler", version="") == 4
    assert done.value("doubler_rows_total", kind="x") == 4


async def test_metrics_path_is_configurable_and_can_be_off(serve: Any, scrape: Any) -> None:
    async with serve(make_app(metrics_path="/prom")) as client:
        assert (await client.get("/metrics")).status_code == 404
        m = await scrape(client, "/prom")
        assert (
            m.value("rest_server_requests_total", method="GET", path=UNMATCHED, status_code="404")
            == 1
        )
    for off in (None, ""):
        async with serve(make_app(metrics_path=off)) as client:
            assert (await client.get("/metrics")).status_code == 404
    with pytest.raises(SettingsError, match="must start with '/'"):
        make_app(metrics_path="metrics")


async def test_openmetrics_and_gzip_on_request(serve: Any) -> None:
    async with serve(make_app()) as client:
        await client.post("/v2/models/doubler/infer", json=body())
        response = await client.get(
            "/metrics",
            headers={
                "accept": "application/openmetrics-text; version=1.0.0",
                "accept-encoding": "gzip",
            },
        )
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.headers["content-encoding"] == "gzip"
        assert response.text.endswith("# EOF\n")
        assert 'model_infer_request_success_total{model="doubler",version=""} 1.0' in response.text


@asynccontextmanager
async def hosting(*apps: V2App, routes: list[Any]) -> AsyncIterator[httpx.AsyncClient]:
    host = Starlette(routes=routes)
    async with anyio.create_task_group() as tg:
        for app in apps:
            tg.start_soon(app.startup)
    try:
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as client:
            yield client
    finally:
        for app in apps:
            await app.shutdown()


async def test_mounted_apps_label_templates_and_never_mix(scrape: Any) -> None:
    first, second = make_app(metrics_path=None), make_app()
    routes = [
        Mount("/a", first),
        Mount("/b", second),
        Route("/metrics", metrics_endpoint(first)),
    ]
    async with hosting(first, second, routes=routes) as client:
        for _ in range(2):
            await client.post("/a/v2/models/doubler/infer", json=body())
        await client.post("/b/v2/models/doubler/infer", json=body())
        await client.post("/b/v2/models/failing/infer", json=body())
        assert (await client.get("/a/metrics")).status_code == 404  # first serves none itself
        a, b = await scrape(client, "/metrics"), await scrape(client, "/b/metrics")
    success = "model_infer_request_success_total"
    assert a.value(success, model="doubler", version="") == 2
    assert b.value(success, model="doubler", version="") == 1
    assert not a.has("model_infer_request_failure_total", model="failing", version="")
    assert b.value("model_infer_request_failure_total", model="failing", version="") == 1
    assert a.value("rest_server_requests_total", method="POST", path=INFER, status_code="200") == 2
    paths = {labels["path"] for labels in b.labels("rest_server_requests_total")}
    assert paths == {INFER}


async def test_requests_through_the_middleware_are_counted(scrape: Any) -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    host = Starlette(routes=[Route("/hello", hello)])
    host.add_middleware(V2Middleware, [Doubler()], model_parallel_workers=0)
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as client:
        assert (await client.get("/hello")).text == "hi"
        assert (await client.post("/v2/models/doubler/infer", json=body())).status_code == 200
        m = await scrape(client)
    assert m.value("model_infer_request_success_total", model="doubler", version="") == 1
    assert {labels["path"] for labels in m.labels("rest_server_requests_total")} == {INFER}
