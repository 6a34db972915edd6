"""``V2Middleware`` inside Starlette and FastAPI hosts: routing, lifespan, host middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2mount import InferenceRequest, Model, V2App, V2Middleware
from v2mount.registry import ModelState
from v2mount.testing import AsyncV2Client, LifespanError, V2HTTPError, run_lifespan

pytestmark = pytest.mark.anyio

AsyncFactory = Callable[..., Awaitable[AsyncV2Client]]


class Doubler(Model):
    name = "doubler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def __init__(self, events: list[str] | None = None) -> None:
        super().__init__()
        self.events = events if events is not None else []

    def load(self) -> None:
        self.events.append("model loaded")

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"] * 2}


async def hello(request: Request) -> Response:
    return PlainTextResponse(f"host {request.url.path}")


HOST_ROUTES = [Route("/", hello), Route("/v2/users", hello), Route("/api/v2/users", hello)]


def handle(app: V2App) -> Any:
    return next(iter(app.registry.handles()))


class Recorder:
    """A host that records the scope objects it receives and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await PlainTextResponse("host")(scope, receive, send)


async def call(app: ASGIApp, scope: Scope) -> int:
    """Run one bodiless request through ``app``; the response status."""
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def http_scope(path: str, method: str = "GET", root_path: str = "") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
    }


@pytest.mark.parametrize(
    "path",
    ["/", "/v2users", "/v2/users", "/v2/models/doubler/infer/extra", "/metricsx", "/v2/docsx"],
)
async def test_other_paths_reach_the_host_untouched(path: str) -> None:
    host = Recorder()
    middleware = V2Middleware(host, [Doubler()], model_parallel_workers=0)
    scope = http_scope(path)
    assert await call(middleware, scope) == 200
    assert host.scopes == [scope] and host.scopes[0] is scope
    assert not handle(middleware.v2app).ready  # nothing started for a host request


async def test_websockets_reach_the_host() -> None:
    host = Recorder()
    middleware = V2Middleware(host, [Doubler()], model_parallel_workers=0)
    scope = {**http_scope("/v2/health/live"), "type": "websocket"}
    await middleware(scope, None, None)  # type: ignore[arg-type]
    assert host.scopes == [scope]


@pytest.mark.parametrize(
    ("path", "root_path", "owned"),
    [
        ("/api/v2", "", True),
        ("/api/v2/health/live", "", True),
        ("/api/v2/models/doubler/versions/3/infer", "", True),
        ("/api/v2/docs", "", True),
        ("/api/metrics", "", True),
        ("/v2/health/live", "", False),
        ("/api/v2/users", "", False),
        ("/apiv2/health/live", "", False),
        ("/proxy/api/v2/health/live", "/proxy", True),
        ("/proxy/v2/health/live", "/proxy", False),
    ],
)
def test_owns_the_v2app_routes_below_the_prefix(path: str, root_path: str, owned: bool) -> None:
    middleware = V2Middleware(Recorder(), [Doubler()], prefix="/api", model_parallel_workers=0)
    assert middleware.owns(http_scope(path, root_path=root_path)) is owned


def test_metrics_path_and_docs_follow_the_settings() -> None:
    middleware = V2Middleware(Recorder(), [Doubler()], metrics_path="/ops/prom", docs_enabled=False)
    assert middleware.owns(http_scope("/ops/prom"))
    assert not middleware.owns(http_scope("/metrics"))
    assert not middleware.owns(http_scope("/v2/docs"))


@pytest.mark.parametrize("prefix", ["api", "/api/", "/"])
def test_a_bad_prefix_fails_at_construction(prefix: str) -> None:
    with pytest.raises(ValueError, match="must start with '/' and not end with '/'"):
        V2Middleware(Recorder(), prefix=prefix)


def test_a_ready_v2app_excludes_the_arguments_to_build_one() -> None:
    v2app = V2App([Doubler()])
    assert V2Middleware(Recorder(), v2app=v2app).v2app is v2app
    with pytest.raises(ValueError, match="either v2app or the arguments"):
        V2Middleware(Recorder(), [Doubler()], v2app=v2app)
    with pytest.raises(ValueError, match="either v2app or the arguments"):
        V2Middleware(Recorder(), v2app=v2app, model_parallel_workers=0)


def starlette_host(events: list[str], prefix: str = "/api") -> tuple[Starlette, V2App]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host started")
        yield
        events.append("host stopping")

    v2app = V2App([Doubler(events)], model_parallel_workers=0)
    host = Starlette(
        routes=HOST_ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(V2Middleware, prefix=prefix, v2app=v2app)],
    )
    return host, v2app


async def test_serves_oip_under_the_prefix_beside_the_host_routes(
    v2_async_client: AsyncFactory,
) -> None:
    client = await v2_async_client(starlette_host([])[0], prefix="/api")
    result = await client.infer("doubler", {"x": np.array([[1, 2]], np.float32)})
    np.testing.assert_array_equal(result["y"], [[2, 4]])
    assert (await client.metadata())["name"] == "v2mount"
    assert (await client.http.get("/")).text == "host /"
    assert (await client.http.get("/api/v2/users")).text == "host /api/v2/users"
    assert (await client.http.get("/v2/users")).text == "host /v2/users"
    missing = await client.http.get("/v2/health/live")
    assert missing.status_code == 404 and missing.text == "Not Found"  # the host's 404
    wrong_method = await client.get("/v2/models/doubler/infer")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    with pytest.raises(V2HTTPError) as caught:
        await client.infer("nobody", {"x": np.ones((1, 2), np.float32)})
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'nobody' not found"


async def test_docs_and_metrics_under_the_prefix(v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client(starlette_host([])[0], prefix="/api")
    page = await client.get("/v2/docs")
    assert page.status_code == 200 and "/api/v2/docs/openapi.json" in page.text
    spec = (await client.get("/v2/docs/openapi.json")).json()
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert [server["url"] for server in spec["servers"]] == ["/api"]
    await client.infer("doubler", {"x": np.ones((1, 2), np.float32)})
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert 'model_infer_request_success_total{model="doubler",version=""} 1.0' in metrics.text


async def test_host_lifespan_starts_models_after_the_host_and_stops_them() -> None:
    events: list[str] = []
    host, v2app = starlette_host(events)
    async with run_lifespan(host):
        assert events == ["host started", "model loaded"]
        assert handle(v2app).ready
    assert events[-1] == "host stopping"
    assert handle(v2app).state is ModelState.UNAVAILABLE and not handle(v2app).ready


async def test_models_stop_even_when_the_host_shutdown_fails() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("host shutdown broke")

    v2app = V2App([Doubler()], model_parallel_workers=0)
    host = Starlette(lifespan=lifespan, middleware=[Middleware(V2Middleware, v2app=v2app)])
    with pytest.raises((RuntimeError, LifespanError), match="host shutdown broke"):
        async with run_lifespan(host):
            assert handle(v2app).ready
    assert handle(v2app).state is ModelState.UNAVAILABLE


async def test_without_a_lifespan_models_start_on_the_first_oip_request() -> None:
    middleware = V2Middleware(Recorder(), [Doubler()], model_parallel_workers=0)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/")).text == "host"
        assert not handle(middleware.v2app).ready
        assert (await http.get("/v2/models/doubler/ready")).status_code == 200
    await middleware.v2app.shutdown()


class TokenAuth:
    """Pure ASGI auth: a bearer token on every HTTP request except ``open_paths``."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self.app, self.token, self.open_paths = app, token, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {self.token}".encode():
                response = JSONResponse({"error": "unauthorized"}, 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def test_host_auth_middleware_protects_the_oip_routes(v2_async_client: AsyncFactory) -> None:
    host = FastAPI()
    host.add_middleware(V2Middleware, models=[Doubler()], model_parallel_workers=0)
    host.add_middleware(
        TokenAuth, token="s3cret", open_paths=frozenset({"/v2/health/live", "/v2/health/ready"})
    )

    @host.get("/hello")
    async def hello_route() -> dict[str, str]:
        return {"hello": "world"}

    client = await v2_async_client(host)
    assert await client.live() and await client.ready()
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    denied = await client.post("/v2/models/doubler/infer", json=body)
    assert denied.status_code == 401 and denied.json() == {"error": "unauthorized"}
    assert (await client.get("/v2")).status_code == 401
    assert (await client.http.get("/hello")).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    allowed = await client.post("/v2/models/doubler/infer", json=body, headers=auth)
    assert allowed.status_code == 200 and allowed.json()["outputs"][0]["data"] == [2, 4]
    assert (await client.http.get("/hello", headers=auth)).json() == {"hello": "world"}
