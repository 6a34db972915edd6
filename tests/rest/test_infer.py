"""The inference route's lean path, seen as plain ASGI: by the server, a host, a middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from v2mount import InferenceRequest, Model, V2App, V2Middleware
from v2mount.rest.infer import CLIENT_CLOSED, MODEL_INFER, VERSION_INFER

pytestmark = pytest.mark.anyio

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

BODY = orjson.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}]}
)

LENGTH = str(len(BODY)).encode()


class Twice(Model):
    name = "twice"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"] * 2}


def scope(path: str, method: str = "POST", root_path: str = "") -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": root_path,
        "query_string": b"", "headers": [(b"host", b"test"), (b"content-length", LENGTH)],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip


async def call(app: ASGIApp, request_scope: dict[str, Any], chunks: list[bytes]) -> list[Any]:
    """The messages ``app`` sends for a body that arrives in ``chunks``."""
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(request_scope, receive, send)
    return sent


def check_answer(sent: list[dict[str, Any]]) -> None:
    """One ``http.response.start`` and one final ``http.response.body``, as ASGI says."""
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    start, body = sent
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert all(isinstance(k, bytes) and k == k.lower() for k, _ in start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert not body.get("more_body", False)
    answer = orjson.loads(body["body"])
    assert answer["outputs"][0]["data"] == [3.0, 5.0]


@pytest.mark.parametrize("chunks", [[BODY], [BODY[:7], BODY[7:20], b"", BODY[20:]]])
async def test_the_answer_is_standard_asgi_for_every_way_in(chunks: list[bytes]) -> None:
    v2app = V2App([Twice()], model_parallel_workers=0)
    host = Starlette(routes=[Mount("/ml", v2app)])
    middleware = V2Middleware(Starlette(), v2app=v2app, prefix="/api")
    async with v2app.lifespan():
        check_answer(await call(v2app, scope("/v2/models/twice/infer"), chunks))
        check_answer(await call(host, scope("/ml/v2/models/twice/infer"), chunks))
        check_answer(await call(middleware, scope("/api/v2/models/twice/infer"), chunks))
        # Behind a proxy that strips a prefix into root_path.
        proxied = scope("/edge/v2/models/twice/infer", root_path="/edge")
        check_answer(await call(v2app, proxied, chunks))


def samples(text: str, name: str) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = sample.labels
                found[(labels["method"], labels["path"], labels["status_code"])] = sample.value
    return found


async def test_one_match_labels_the_metrics_and_finds_the_model(serve: Any) -> None:
    v2app = V2App(
        [Twice(), Twice(name="twice", parameters={"version": "7"})], model_parallel_workers=0
    )
    async with serve(v2app) as client:
        assert (await client.post("/v2/models/twice/infer", content=BODY)).status_code == 200
        r = await client.post("/v2/models/twice/versions/7/infer", content=BODY)
        assert r.status_code == 200 and r.json()["model_version"] == "7"
        r = await client.post("/v2/models/twice/versions/8/infer", content=BODY)
        assert r.status_code == 404 and "no version '8'" in r.json()["error"]
        r = await client.post("/v2/models/nope/infer", content=BODY)
        assert r.status_code == 404
        # Not the inference route: Starlette's router answers, metrics label them as before.
        assert (await client.get("/v2/models/twice/infer")).status_code == 405
        r = await client.post("/v2/models/twice/infer/")  # Starlette's slash redirect
        assert (r.status_code, r.headers["location"]) == (
            307,
            "http://v2mount.test" + MODEL_INFER.replace("{name}", "twice"),
        )
        text = (await client.get("/metrics")).text
    counted = samples(text, "rest_server_requests_total")
    assert counted[("POST", MODEL_INFER, "200")] == 1
    assert counted[("POST", VERSION_INFER, "200")] == 1
    assert counted[("POST", VERSION_INFER, "404")] == 1
    assert counted[("POST", MODEL_INFER, "404")] == 1
    assert counted[("GET", MODEL_INFER, "405")] == 1


async def test_a_client_that_leaves_mid_body_gets_nothing_and_is_counted(serve: Any) -> None:
    v2app = V2App([Twice()], model_parallel_workers=0)
    async with serve(v2app) as client:
        messages = [
            {"type": "http.request", "body": BODY[:10], "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await v2app(scope("/v2/models/twice/infer"), receive, send)
        assert sent == []
        text = (await client.get("/metrics")).text
        assert (await client.post("/v2/models/twice/infer", content=BODY)).status_code == 200
    counted = samples(text, "rest_server_requests_total")
    assert counted == {("POST", MODEL_INFER, str(CLIENT_CLOSED)): 1}


async def test_a_binary_answer_carries_its_framing_headers(serve: Any) -> None:
    request = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}],
        "parameters": {"binary_data_output": True},
    }
    async with serve(V2App([Twice()], model_parallel_workers=0)) as client:
        r = await client.post("/v2/models/twice/infer", json=request)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        length = int(r.headers["inference-header-content-length"])
        header = orjson.loads(r.content[:length])
        assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
        np.testing.assert_array_equal(np.frombuffer(r.content[length:], np.float32), [3.0, 5.0])
