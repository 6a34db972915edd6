"""Swagger docs: valid OpenAPI 3.0 matching the routes, offline assets, mount prefixes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Match, Mount, Route
from swagger_ui_bundle import swagger_ui_path

from v2mount import InferenceRequest, Model, V2App, V2Middleware
from v2mount.rest.docs import STATIC_FILES
from v2mount.rest.openapi import EXAMPLE_MAX_ELEMENTS, example_request
from v2mount.runtimes import CallableModel

pytestmark = pytest.mark.anyio


class Classifier(Model):
    name = "my classifier"  # a space: must be quoted in URLs
    platform = "numpy"
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "flags", "datatype": "BOOL", "shape": [-1]},
        {"name": "tag", "datatype": "BYTES", "shape": [1]},
        {"name": "k", "datatype": "INT64", "shape": [2, 2]},
    ]
    outputs = [
        {"name": "scores", "datatype": "FP64", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        x = payload["x"]
        return {"scores": x[:, :2].astype("f8"), "label": (x.sum(axis=1) > 0).astype("i8")}


class Echo(Model):
    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


class Versioned(Model):
    inputs = [{"name": "n", "datatype": "INT32", "shape": [-1]}]
    outputs = [{"name": "v", "datatype": "INT32", "shape": [-1]}]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"v": payload["n"] * 0 + int(self.settings.version or 0)}


def make_app(**overrides: Any) -> V2App:
    return V2App(
        [
            Classifier(),
            Echo(),
            Versioned(name="ver", parameters={"version": "1"}),
            Versioned(name="ver", parameters={"version": "2"}),
        ],
        model_parallel_workers=0,
        **overrides,
    )


def served_operations(app: V2App) -> set[tuple[str, str]]:
    """(method, path) of every route ``app`` answers that belongs in its schema."""
    found = set()
    for route in app.routes():
        if isinstance(route, Route) and route.include_in_schema:
            for method in route.methods or ():
                if method != "HEAD":
                    found.add((method.lower(), route.path))
    return found


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


def example(document: dict[str, Any], path: str) -> Any:
    content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return content["example"]


async def try_it(
    client: httpx.AsyncClient, document: dict[str, Any], path: str, server: str = ""
) -> Any:
    """What Swagger UI's "Try it out" sends: the example body to server URL + path."""
    answer = await client.post(server + path, json=example(document, path))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_server_document_is_valid_and_lists_exactly_the_routes(serve: Any) -> None:
    app = make_app()
    async with serve(app) as client:
        response = await client.get("/v2/docs/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.0.3"
    assert "servers" not in document  # not mounted: Swagger UI uses the page's origin
    assert documented(document) == served_operations(app)
    assert ("get", "/metrics") in documented(document)
    assert ("post", "/v2/models/{name}/versions/{version}/infer") in documented(document)
    assert not any("/docs" in path for _, path in documented(document))
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    # every route has a written description, none the generic fallback
    assert all(not re.match(r"(get|post)_", op_id) for op_id in ids)
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert [p["name"] for p in infer["parameters"]] == [
        "name",
        "Inference-Header-Content-Length",
        "Content-Encoding",
    ]
    assert {"413", "415"} <= set(infer["responses"])
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}


async def test_server_document_follows_the_settings(serve: Any) -> None:
    app = make_app(metrics_path=None)
    async with serve(app) as client:
        document = (await client.get("/v2/docs/openapi.json")).json()
    validate(document)
    assert documented(document) == served_operations(app)
    assert not any(path == "/metrics" for _, path in documented(document))
    async with serve(make_app(docs_enabled=False)) as client:
        for path in ("/v2/docs", "/v2/docs/openapi.json", "/v2/models/echo/docs"):
            assert (await client.get(path)).status_code == 404, path


async def test_model_document_describes_its_tensors_and_its_example_runs(serve: Any) -> None:
    app = make_app()
    async with serve(app) as client:
        response = await client.get("/v2/models/my%20classifier/docs/openapi.json")
        assert response.status_code == 200
        document = response.json()
        validate(document)
        assert document["info"]["title"] == "my classifier"
        assert "| `x` | FP32 | [-1, 3] |" in document["info"]["description"]
        base = "/v2/models/my%20classifier"
        assert documented(document) == {
            ("get", base),
            ("get", base + "/ready"),
            ("get", base + "/stats"),
            ("post", base + "/infer"),
        }
        for method, path in documented(document):  # each is a route the app serves
            scope = {"type": "http", "method": method.upper(), "path": path.replace("%20", " ")}
            assert any(r.matches(scope)[0] is Match.FULL for r in app.routes()), path
        body = example(document, base + "/infer")
        assert body == {
            "inputs": [
                {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0, 0.0, 0.0]},
                {"name": "flags", "shape": [1], "datatype": "BOOL", "data": [False]},
                {"name": "tag", "shape": [1], "datatype": "BYTES", "data": [""]},
                {"name": "k", "shape": [2, 2], "datatype": "INT64", "data": [0, 0, 0, 0]},
            ]
        }
        answer = await try_it(client, document, base + "/infer")
        assert {o["name"] for o in answer["outputs"]} == {"scores", "label"}

        metadata = document["paths"][base]["get"]["responses"]["200"]["content"]
        assert metadata["application/json"]["example"] == (await client.get(base)).json()
        schemas = document["components"]["schemas"]
        names = [s["properties"]["name"]["enum"] for s in schemas["ModelInput"]["oneOf"]]
        assert names == [["x"], ["flags"], ["tag"], ["k"]]
        x = schemas["ModelInput"]["oneOf"][0]["properties"]
        assert (x["shape"]["minItems"], x["data"]["items"]) == (2, {"type": "number"})
        assert schemas["ModelRequestedOutput"]["properties"]["name"]["enum"] == [
            "scores",
            "label",
        ]


async def test_versioned_and_undeclared_models(serve: Any) -> None:
    app = make_app()
    async with serve(app) as client:
        document = (await client.get("/v2/models/ver/versions/1/docs/openapi.json")).json()
        validate(document)
        assert document["info"]["title"] == "ver (version 1)"
        assert all(path.startswith("/v2/models/ver/versions/1") for _, path in documented(document))
        assert len(documented(document)) == 4
        answer = await try_it(client, document, "/v2/models/ver/versions/1/infer")
        assert answer["outputs"][0]["data"] == [1]

        unversioned = (await client.get("/v2/models/ver/docs/openapi.json")).json()
        assert all("/versions/" not in path for _, path in documented(unversioned))
        assert "Versions served: `1`, `2`" in unversioned["info"]["description"]

        document = (await client.get("/v2/models/echo/docs/openapi.json")).json()
        validate(document)
        assert document["components"]["schemas"]["ModelInput"] == {
            "$ref": "#/components/schemas/RequestInput"
        }
        answer = await try_it(client, document, "/v2/models/echo/infer")
        assert answer["outputs"][0]["data"] == [1.0, 2.0]

        for path in (
            "/v2/models/nope/docs",
            "/v2/models/nope/docs/openapi.json",
            "/v2/models/ver/versions/9/docs",
            "/v2/models/ver/versions/9/docs/openapi.json",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert re.search("not found|has no version", response.json()["error"]), path


async def test_the_example_for_bytes_inputs_decodes_by_content_type(serve: Any) -> None:
    texts = [
        {"name": name, "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": kind}}
        for name, kind in [("when", "datetime"), ("blob", "base64"), ("word", "str")]
    ]
    decoded = CallableModel(
        name="texts",
        inputs=texts,
        function=lambda inputs: {"kinds": [type(inputs[k][0]).__name__ for k in sorted(inputs)]},
    )
    async with serve(V2App([decoded], model_parallel_workers=0)) as client:
        document = (await client.get("/v2/models/texts/docs/openapi.json")).json()
        answer = await try_it(client, document, "/v2/models/texts/infer")
    assert answer["outputs"][0]["data"] == ["bytes", "datetime", "str"]


def test_no_example_for_huge_inputs() -> None:
    side = int(EXAMPLE_MAX_ELEMENTS**0.5) + 1
    big = [{"name": "n", "datatype": "INT32", "shape": [side, side]}]
    model = Versioned(name="big", inputs=big)
    assert example_request(model.settings) is None


def asset_links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


async def test_pages_load_their_assets_from_the_app(serve: Any) -> None:
    async with serve(make_app()) as client:
        page = (await client.get("/v2/docs")).text
        links = asset_links(page)
        assert links and all(link.startswith("/v2/docs/static/") for link in links)
        assert "://" not in page  # no CDN, no online validator
        assert 'url: "/v2/docs/openapi.json"' in page
        assert "validatorUrl: null" in page
        model_page = (await client.get("/v2/models/my%20classifier/docs")).text
        assert asset_links(model_page) == links
        assert 'url: "/v2/models/my%20classifier/docs/openapi.json"' in model_page
        versioned = (await client.get("/v2/models/ver/versions/2/docs")).text
        assert 'url: "/v2/models/ver/versions/2/docs/openapi.json"' in versioned
        for name, media_type in STATIC_FILES.items():
            response = await client.get(f"/v2/docs/static/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"] == media_type
            assert response.content == (Path(str(swagger_ui_path)) / name).read_bytes()
        for link in links:
            assert (await client.get(link)).status_code == 200
        for name in ("index.html", "..%2Fswagger-ui.js", "swagger-ui.js"):
            assert (await client.get(f"/v2/docs/static/{name}")).status_code == 404


async def test_correct_under_a_mount_prefix() -> None:
    app = make_app()
    host = Starlette(routes=[Mount("/ml", app)])
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as client:
            page = (await client.get("/ml/v2/docs")).text
            links = asset_links(page)
            assert links and all(link.startswith("/ml/v2/docs/static/") for link in links)
            for link in links:
                assert (await client.get(link)).status_code == 200
            assert 'url: "/ml/v2/docs/openapi.json"' in page
            document = (await client.get("/ml/v2/docs/openapi.json")).json()
            validate(document)
            assert document["servers"] == [{"url": "/ml"}]
            assert documented(document) == served_operations(app)

            model_page = (await client.get("/ml/v2/models/ver/docs")).text
            assert 'url: "/ml/v2/models/ver/docs/openapi.json"' in model_page
            document = (await client.get("/ml/v2/models/ver/docs/openapi.json")).json()
            validate(document)
            server = document["servers"][0]["url"]
            answer = await try_it(client, document, "/v2/models/ver/infer", server)
            assert answer["outputs"][0]["data"] == [2]
    finally:
        await app.shutdown()


async def test_correct_behind_the_middleware_prefix() -> None:
    host = Starlette()
    host.add_middleware(V2Middleware, [Echo()], prefix="/api", model_parallel_workers=0)
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as client:
        page = (await client.get("/api/v2/models/echo/docs")).text
        assert all(link.startswith("/api/v2/docs/static/") for link in asset_links(page))
        assert 'url: "/api/v2/models/echo/docs/openapi.json"' in page
        document = (await client.get("/api/v2/models/echo/docs/openapi.json")).json()
        assert document["servers"] == [{"url": "/api"}]
