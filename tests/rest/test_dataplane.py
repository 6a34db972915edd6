"""The core OIP routes through the real ASGI app (in-process models)."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from v2mount import InferenceRequest, Model, ModelSettings, V2App
from v2mount.types import DATATYPES

pytestmark = pytest.mark.anyio


class Doubler(Model):
    name = "doubler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [
        {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "total", "datatype": "FP64", "shape": [-1]},
    ]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        x = payload["x"]
        return {"y": x * 2, "total": x.sum(axis=1)}


class Echo(Model):
    """No declared metadata: returns its inputs, plus what it saw of the protocol."""

    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        outputs: dict[str, Any] = {name: payload[name] for name in payload}
        if "want_params" in payload.parameters:
            outputs["params"] = np.array([str(sorted(payload.parameters))])
        return outputs


class AsyncEcho(Model):
    name = "async-echo"

    async def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"out": payload["x"] + 1}


class Failing(Model):
    name = "failing"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        raise RuntimeError("secret /srv/model.py broke: bad weights")


class BadLoad(Model):
    name = "bad-load"

    def load(self) -> None:
        raise ValueError("weights missing")


class Versioned(Model):
    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"v": np.array([int(self.settings.version or 0)])}


def make_app() -> V2App:
    return V2App(
        [
            Doubler(),
            Echo(),
            AsyncEcho(),
            Failing(),
            BadLoad(),
            Versioned(name="ver", parameters={"version": "1"}),
            Versioned(name="ver", parameters={"version": "2"}),
            Versioned(name="ver", parameters={"version": "10"}),
            Versioned(name="pinned", parameters={"version": "1"}, default_version=True),
            Versioned(name="pinned", parameters={"version": "2"}),
        ],
        model_parallel_workers=0,
    )


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


async def test_server_metadata_and_health(serve: Any) -> None:
    async with serve(make_app()) as client:
        meta = (await client.get("/v2")).json()
        assert meta["name"] == "v2mount"
        assert {"binary_tensor_data", "model_repository", "statistics"} <= set(meta["extensions"])
        live = await client.get("/v2/health/live")
        assert (live.status_code, live.json()) == (200, {"live": True})
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 400  # bad-load never loads: OIP says 4xx, as Triton
        assert "bad-load" in ready.json()["error"]


async def test_model_ready_and_metadata(serve: Any) -> None:
    async with serve(make_app()) as client:
        r = await client.get("/v2/models/doubler/ready")
        assert (r.status_code, r.json()) == (200, {"name": "doubler", "ready": True})
        r = await client.get("/v2/models/bad-load/ready")
        assert r.status_code == 400 and r.json()["ready"] is False
        assert "weights missing" in r.json()["error"]
        r = await client.get("/v2/models/doubler")
        assert r.json() == {
            "name": "doubler",
            "platform": "",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "total", "datatype": "FP64", "shape": [-1]},
            ],
        }
        r = await client.get("/v2/models/ver")
        assert r.json()["versions"] == ["1", "2", "10"]
        r = await client.get("/v2/models/ver/versions/2/ready")
        assert r.status_code == 200
        for path in (
            "/v2/models/nope",
            "/v2/models/nope/ready",
            "/v2/models/ver/versions/3",
            "/v2/models/ver/versions/3/ready",
        ):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]


async def test_infer_flat_and_nested_with_id_and_outputs(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {"id": "req-1", "inputs": [tensor("x", "FP32", [2, 2], [[1, 2], [3, 4.5]])]}
        r = await client.post("/v2/models/doubler/infer", json=body)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        doc = r.json()
        assert doc["id"] == "req-1" and doc["model_name"] == "doubler"
        assert "model_version" not in doc and "parameters" not in doc
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert outputs["y"] == {
            "name": "y",
            "datatype": "FP32",
            "shape": [2, 2],
            "data": [2.0, 4.0, 6.0, 9.0],
        }
        assert outputs["total"]["data"] == [3.0, 7.5]
        body = {"inputs": [tensor("x", "FP32", [1, 2], [1, 2])], "outputs": [{"name": "total"}]}
        doc = (await client.post("/v2/models/doubler/infer", json=body)).json()
        assert [o["name"] for o in doc["outputs"]] == ["total"]
        assert uuid.UUID(doc["id"]).version == 4  # no id sent: a new one, as MLServer


async def test_infer_without_content_type(serve: Any) -> None:
    async with serve(make_app()) as client:
        content = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'
        r = await client.post(
            "/v2/models/doubler/infer", content=content, headers={"content-type": ""}
        )
        assert r.status_code == 200
        assert r.json()["outputs"][0]["data"] == [2.0, 4.0]


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_round_trips(serve: Any, datatype: str) -> None:
    values: dict[str, list[Any]] = {
        "BOOL": [True, False, True, True],
        "UINT8": [0, 1, 254, 255],
        "UINT16": [0, 1, 65534, 65535],
        "UINT32": [0, 1, 2, 4294967295],
        "UINT64": [0, 9007199254740993, 18446744073709551614, 18446744073709551615],
        "INT8": [-128, -1, 0, 127],
        "INT16": [-32768, -1, 0, 32767],
        "INT32": [-2147483648, -1, 0, 2147483647],
        "INT64": [-9223372036854775808, -9007199254740993, 0, 9223372036854775807],
        "FP16": [0.5, -1.0, 2.0, 1024.0],
        "FP32": [0.1, -1.5, 3.25, 1e30],
        "FP64": [0.1, -1.5, 1e-300, 1e300],
        "BYTES": ["héllo", "", "a b", "日本"],
    }[datatype]
    async with serve(make_app()) as client:
        body = {"inputs": [tensor("t", datatype, [2, 2], values)]}
        r = await client.post("/v2/models/echo/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert (out["datatype"], out["shape"]) == (datatype, [2, 2])
        if datatype == "FP32":
            np.testing.assert_array_equal(
                np.array(out["data"], np.float32), np.array(values, np.float32)
            )
        else:
            assert out["data"] == values


async def test_parameters_reach_the_model_and_unknown_keys_are_fine(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {
            "parameters": {"want_params": True, "sequence_id": 7, "custom": "x"},
            "inputs": [tensor("a", "INT32", [1], [1])],
        }
        doc = (await client.post("/v2/models/echo/infer", json=body)).json()
        params = {o["name"]: o for o in doc["outputs"]}["params"]
        assert params["data"] == ["['custom', 'sequence_id', 'want_params']"]


async def test_async_predict(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {"inputs": [tensor("x", "INT64", [3], [1, 2, 3])]}
        doc = (await client.post("/v2/models/async-echo/infer", json=body)).json()
        assert doc["outputs"][0]["data"] == [2, 3, 4]


async def test_versions_default_and_explicit(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {"inputs": [tensor("x", "INT32", [1], [0])]}
        doc = (await client.post("/v2/models/ver/infer", json=body)).json()
        assert (doc["model_version"], doc["outputs"][0]["data"]) == ("10", [10])
        doc = (await client.post("/v2/models/ver/versions/2/infer", json=body)).json()
        assert (doc["model_version"], doc["outputs"][0]["data"]) == ("2", [2])
        doc = (await client.post("/v2/models/pinned/infer", json=body)).json()
        assert doc["model_version"] == "1"
        r = await client.post("/v2/models/ver/versions/9/infer", json=body)
        assert r.status_code == 404 and "version '9'" in r.json()["error"]


BAD_BODIES: list[tuple[str, bytes | dict[str, Any] | list[Any], str]] = [
    ("truncated", b'{"inputs": [', "malformed JSON"),
    ("array", [1, 2], "must be a JSON object"),
    ("no inputs", {"id": "x"}, "'inputs' must be a non-empty list"),
    ("empty inputs", {"inputs": []}, "'inputs' must be a non-empty list"),
    ("id not string", {"id": 5, "inputs": [tensor("x", "FP32", [1, 2], [1, 2])]}, "'id'"),
    ("bad datatype", {"inputs": [tensor("x", "FLOAT", [1, 2], [1, 2])]}, "unknown datatype"),
    ("lower datatype", {"inputs": [tensor("x", "fp32", [1, 2], [1, 2])]}, "unknown datatype"),
    ("wrong datatype", {"inputs": [tensor("x", "FP64", [1, 2], [1, 2])]}, "does not match"),
    ("size mismatch", {"inputs": [tensor("x", "FP32", [2, 2], [1, 2])]}, "needs 4 elements"),
    ("negative dim", {"inputs": [tensor("x", "FP32", [-1, 2], [1, 2])]}, "non-negative"),
    ("float dim", {"inputs": [tensor("x", "FP32", [1.0, 2], [1, 2])]}, "non-negative"),
    ("ragged", {"inputs": [tensor("x", "FP32", [2, 2], [[1, 2], [3]])]}, "not valid FP32"),
    ("string data", {"inputs": [tensor("x", "FP32", [1, 2], ["a", "b"])]}, "not valid FP32"),
    ("wrong rank", {"inputs": [tensor("x", "FP32", [2], [1, 2])]}, "does not match"),
    ("trailing dim", {"inputs": [tensor("x", "FP32", [1, 3], [1, 2, 3])]}, "does not match"),
    (
        "unknown input",
        {"inputs": [tensor("x", "FP32", [1, 2], [1, 2]), tensor("z", "FP32", [1], [1])]},
        "unexpected inference input",
    ),
    ("missing input", {"inputs": [tensor("z", "FP32", [1], [1])]}, "unexpected inference input"),
    (
        "unknown output",
        {"inputs": [tensor("x", "FP32", [1, 2], [1, 2])], "outputs": [{"name": "nope"}]},
        "unexpected inference output",
    ),
    ("duplicate input", {"inputs": [tensor("x", "FP32", [1, 2], [1, 2])] * 2}, "more than once"),
    ("no data", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2]}]}, "no 'data'"),
    (
        "huge shape",
        {"inputs": [tensor("x", "FP32", [10**12, 2], [1, 2])]},
        "needs 2000000000000 elements",
    ),
    (
        "params not object",
        {"parameters": [1], "inputs": [tensor("x", "FP32", [1, 2], [1, 2])]},
        "'parameters' must be a JSON object",
    ),
    (
        "binary without header",
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        },
        "Inference-Header-Content-Length",
    ),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_requests_get_400_with_error(
    serve: Any, case: str, body: Any, message: str
) -> None:
    async with serve(make_app()) as client:
        if isinstance(body, bytes):
            r = await client.post("/v2/models/doubler/infer", content=body)
        else:
            r = await client.post("/v2/models/doubler/infer", json=body)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        assert message in r.json()["error"]
        assert (await client.get("/v2/models/doubler/ready")).status_code == 200


async def test_out_of_range_integer_is_400(serve: Any) -> None:
    async with serve(make_app()) as client:
        for datatype, value in (("UINT8", 256), ("UINT64", -1), ("INT64", 2**63)):
            body = {"inputs": [tensor("t", datatype, [1], [value])]}
            r = await client.post("/v2/models/echo/infer", json=body)
            assert r.status_code == 400, (datatype, r.text)


async def test_model_exception_is_500_without_traceback(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {"inputs": [tensor("x", "FP32", [1], [1])]}
        r = await client.post("/v2/models/failing/infer", json=body)
        assert r.status_code == 500
        error = r.json()["error"]
        assert "RuntimeError" in error and "bad weights" in error
        assert "Traceback" not in r.text and 'File "' not in r.text


async def test_not_ready_model_infer_is_503(serve: Any) -> None:
    async with serve(make_app()) as client:
        body = {"inputs": [tensor("x", "FP32", [1], [1])]}
        r = await client.post("/v2/models/bad-load/infer", json=body)
        assert r.status_code == 503 and "weights missing" in r.json()["error"]


async def test_unknown_route_and_method_are_json(serve: Any) -> None:
    async with serve(make_app()) as client:
        r = await client.get("/v2/whatever")
        assert (r.status_code, r.json()) == (404, {"error": "Not Found"})
        r = await client.get("/v2/models/doubler/infer")
        assert r.status_code == 405 and r.json()["error"]


async def test_body_limit_is_413(serve: Any) -> None:
    app = V2App([Doubler()], model_parallel_workers=0, max_request_bytes=100)
    async with serve(app) as client:
        body = {"inputs": [tensor("x", "FP32", [10, 2], list(range(20)))]}
        r = await client.post("/v2/models/doubler/infer", json=body)
        assert r.status_code == 413 and "limit" in r.json()["error"]


async def test_large_tensor_json_round_trip(serve: Any) -> None:
    async with serve(make_app()) as client:
        x = np.random.default_rng(0).random((200_000, 2), dtype=np.float32)
        body = {"inputs": [tensor("x", "FP32", [200_000, 2], x.ravel().tolist())]}
        r = await client.post("/v2/models/doubler/infer", json=body)
        out = {o["name"]: o for o in r.json()["outputs"]}["y"]
        np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(-1, 2), x * 2)


async def test_models_from_settings_objects(serve: Any) -> None:
    settings = ModelSettings(name="from-settings", implementation=Doubler, parallel_workers=0)
    async with serve(V2App([settings])) as client:
        body = {"inputs": [tensor("x", "FP32", [1, 2], [1, 1])]}
        r = await client.post("/v2/models/from-settings/infer", json=body)
        assert r.json()["outputs"][0]["data"] == [2.0, 2.0]
