"""``RestMetricsMiddleware`` on its own: route templates as Starlette picks them, statuses."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Message, Receive, Scope, Send

from v2mount.metrics import AppMetrics
from v2mount.rest.metrics import UNMATCHED, RestMetricsMiddleware


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


ROUTES = [
    Route("/items/{id:int}", ok, methods=["GET"]),
    Route("/items/{name}", ok, methods=["POST"]),
    Route("/files/{rest:path}", ok, methods=["GET"]),
]


def scope(method: str, path: str, root_path: str = "") -> Scope:
    return {"type": "http", "method": method, "path": root_path + path, "root_path": root_path}


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", "/items/5", "/items/{id:int}"),
        ("POST", "/items/5", "/items/{name}"),  # the first route matches the path only
        ("GET", "/items/abc", "/items/{name}"),  # 405: the route matching the path
        ("DELETE", "/items/5", "/items/{id:int}"),  # 405: the first route matching the path
        ("GET", "/files/a/b/c", "/files/{rest:path}"),
        ("GET", "/items", UNMATCHED),
        ("GET", "/items/5/more", UNMATCHED),
    ],
)
@pytest.mark.parametrize("root_path", ["", "/mounted"])
def test_templates_match_starlettes_choice(
    method: str, path: str, template: str, root_path: str
) -> None:
    fast = RestMetricsMiddleware(ok, AppMetrics(), ROUTES)
    slow = RestMetricsMiddleware(ok, AppMetrics(), [*ROUTES, Mount("/never", ok)])
    assert fast.template(scope(method, path, root_path)) == template
    assert slow.template(scope(method, path, root_path)) == template


@pytest.mark.anyio
async def test_an_app_that_raises_is_counted_as_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    metrics = AppMetrics()
    middleware = RestMetricsMiddleware(broken, metrics, ROUTES)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(RuntimeError, match="boom"):
        await middleware(scope("GET", "/items/1"), receive, send)
    labels = {"method": "GET", "path": "/items/{id:int}"}
    value = metrics.registry.get_sample_value
    assert value("rest_server_requests_total", {**labels, "status_code": "500"}) == 1
    assert value("rest_server_requests_in_progress", labels) == 0


@pytest.mark.anyio
async def test_other_scopes_and_odd_methods() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        return None

    metrics = AppMetrics()
    middleware = RestMetricsMiddleware(app, metrics, ROUTES)
    await middleware({"type": "lifespan"}, receive, send)
    await middleware(scope("BREW", "/items/1"), receive, send)
    assert seen == ["lifespan", "http"]
    assert (
        metrics.registry.get_sample_value(
            "rest_server_requests_total",
            {"method": "OTHER", "path": "/items/{id:int}", "status_code": "204"},
        )
        == 1
    )
