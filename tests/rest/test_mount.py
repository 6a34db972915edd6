"""``V2App`` mounted in Starlette and FastAPI hosts: prefixes, lazy start, host lifespans."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from anyio import wait_all_tasks_blocked
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from tests.support import alive
from v2mount import InferenceRequest, Model, V2App
from v2mount.demo.models import Identity
from v2mount.registry import ModelHandle, ModelState
from v2mount.testing import AsyncV2Client, run_lifespan

pytestmark = pytest.mark.anyio

AsyncFactory = Callable[..., Awaitable[AsyncV2Client]]
INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


class SlowLoading(Model):
    """Counts its loads; ``load`` waits for the test to open ``gate``."""

    name = "slow"

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.gate = anyio.Event()

    async def load(self) -> None:
        self.loads += 1
        await self.gate.wait()

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"] + 1}


async def hello(request: Request) -> Response:
    return PlainTextResponse("host")


def only(app: V2App) -> ModelHandle:
    (handle,) = app.registry.handles()
    return handle


async def test_a_host_that_never_forwards_lifespan_loads_once_on_concurrent_first_requests() -> (
    None
):
    model = SlowLoading()
    v2app = V2App([model], model_parallel_workers=0)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host up")  # the host's own start-up; Mount never tells v2app
        yield

    host = Starlette(routes=[Route("/", hello), Mount("/ml", v2app)], lifespan=lifespan)
    statuses: list[int] = []
    async with run_lifespan(host):
        assert events == ["host up"] and model.loads == 0
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

            async def infer() -> None:
                response = await http.post("/ml/v2/models/slow/infer", json=INFER)
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(infer)
                await wait_all_tasks_blocked()
                assert model.loads == 1 and statuses == []
                model.gate.set()
            assert statuses == [200] * 8 and model.loads == 1
            assert (await http.get("/")).text == "host"
    await v2app.shutdown()
    assert only(v2app).state is ModelState.UNAVAILABLE


def composing_host(v2app: V2App, events: list[str]) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host up")
        async with v2app.lifespan():
            events.append("models up")
            yield
        events.append("models down")

    return Starlette(routes=[Route("/", hello), Mount("/ml", v2app)], lifespan=lifespan)


async def test_a_composed_lifespan_loads_before_the_first_request_and_stops_with_the_host() -> None:
    v2app = V2App([Identity()], model_parallel_workers=0)
    events: list[str] = []
    async with run_lifespan(composing_host(v2app, events)):
        assert events == ["host up", "models up"] and only(v2app).ready
    assert events == ["host up", "models up", "models down"]
    assert only(v2app).state is ModelState.UNAVAILABLE


@pytest.mark.parametrize("prefix", ["/ml", "/outer/ml"])
async def test_fastapi_mounts_under_any_prefix(prefix: str, v2_async_client: AsyncFactory) -> None:
    v2app = V2App([Identity()], model_parallel_workers=0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with v2app.lifespan():
            yield

    host = FastAPI(lifespan=lifespan)

    @host.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        return {"item": item}

    if prefix == "/ml":
        host.mount("/ml", v2app)
    else:
        host.mount("/outer", Starlette(routes=[Mount("/ml", v2app)]))
    client = await v2_async_client(host, prefix=prefix)
    result = await client.infer("identity", {"x": np.arange(4, dtype=np.int32).reshape(2, 2)})
    np.testing.assert_array_equal(result["x"], [[0, 1], [2, 3]])
    assert result.datatypes == {"x": "INT32"}
    assert (await client.metadata("identity"))["name"] == "identity"
    page = await client.get("/v2/models/identity/docs")
    assert page.status_code == 200 and f"{prefix}/v2/models/identity/docs/openapi.json" in page.text
    assert (await client.http.get("/items/3")).json() == {"item": 3}
    assert (await client.http.get("/docs")).status_code == 200  # FastAPI's own docs stay


async def test_two_apps_in_one_host_keep_their_own_models_and_metrics(
    v2_async_client: AsyncFactory,
) -> None:
    first = V2App([Identity()], model_parallel_workers=0)
    second = V2App([Identity({"name": "other"})], model_parallel_workers=0)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with first.lifespan(), second.lifespan():
            yield

    host = Starlette(routes=[Mount("/a", first), Mount("/b", second)], lifespan=lifespan)
    a = await v2_async_client(host, prefix="/a")
    b = a.with_prefix("/b")
    await a.infer("identity", {"x": np.ones(3)})
    assert await b.ready("other") and not await b.ready("identity")
    assert (
        'model_infer_request_success_total{model="identity",version=""} 1.0'
        in (await a.get("/metrics")).text
    )
    assert "model_infer_request_success_total{" not in (await b.get("/metrics")).text


def arenas() -> set[str]:
    """This process's shared-memory files (the pools name them v2mount-<pid>-...)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"v2mount-{os.getpid()}-")}


@pytest.mark.slow
async def test_no_worker_process_or_shared_memory_survives_the_host_shutdown() -> None:
    v2app = V2App([Identity({"parallel_workers": 1})])
    before = arenas()

    async with run_lifespan(composing_host(v2app, [])):
        runner: Any = only(v2app)._runner
        pids = list(runner.pids())
        assert len(pids) == 1 and alive(pids[0]) and pids[0] != os.getpid()
        transport = httpx.ASGITransport(app=v2app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.post("/v2/models/identity/infer", json=INFER)
            assert response.json()["outputs"][0]["data"] == [1.0, 2.0]
            big = np.arange(100_000, dtype=np.float32)  # 400 kB: through shared memory
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [big.size]}]}
            body["inputs"][0]["data"] = big.tolist()
            response = await http.post("/v2/models/identity/infer", json=body)
            assert response.json()["outputs"][0]["data"][-1] == 99_999.0
        maps = await anyio.Path("/proc/self/maps").read_text()  # arenas are mapped, unlinked
        assert "/dev/shm/v2mount-" in maps, "the pool holds a shared-memory arena"
    assert not alive(pids[0])
    assert arenas() - before == set()
    assert only(v2app).state is ModelState.UNAVAILABLE
