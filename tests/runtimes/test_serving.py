"""Every example model served end to end: repository → V2App → one worker process each."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from v2mount import V2App
from v2mount.runtimes import OnnxModel

pytestmark = pytest.mark.anyio

Serve = Callable[[V2App], AbstractAsyncContextManager[httpx.AsyncClient]]

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def body(name: str, datatype: str, data: Any, **extra: Any) -> dict[str, Any]:
    array = np.asarray(data)
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
    return {"inputs": [tensor], **extra}


def outputs(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return {out["name"]: out for out in response.json()["outputs"]}


async def test_examples_through_worker_pools(
    serve: Serve, example_repository: Path, load_example: Callable[..., Any]
) -> None:
    app = V2App(repository=example_repository)
    async with serve(app) as client:
        for name, platform in [
            ("sklearn-iris", "sklearn"),
            ("xgboost-iris", "xgboost"),
            ("lightgbm-iris", "lightgbm"),
            ("onnx-iris", "onnxruntime_onnx"),
            ("callable-iris", "python"),
        ]:
            ready = await client.get(f"/v2/models/{name}/ready")
            assert ready.status_code == 200, ready.text
            assert (await client.get(f"/v2/models/{name}")).json()["platform"] == platform

        in_process = load_example("sklearn-iris")  # the same file, loaded in this process
        expected = in_process._estimator.predict_proba(np.asarray(ROWS))
        r = await client.post("/v2/models/sklearn-iris/infer", json=body("x", "FP64", ROWS))
        got = outputs(r)
        assert got["predict"] == {
            "name": "predict",
            "datatype": "INT64",
            "shape": [2],
            "data": [0, 2],
        }
        assert got["predict_proba"]["shape"] == [2, 3]
        np.testing.assert_array_equal(np.reshape(got["predict_proba"]["data"], (2, 3)), expected)

        only = body("x", "FP64", ROWS, outputs=[{"name": "predict_proba"}])
        r = await client.post("/v2/models/xgboost-iris/infer", json=only)
        assert list(outputs(r)) == ["predict_proba"]

        r = await client.post("/v2/models/lightgbm-iris/infer", json=body("x", "FP64", ROWS))
        assert outputs(r)["predict"]["shape"] == [2, 3]

        r = await client.post("/v2/models/onnx-iris/infer", json=body("input", "FP32", ROWS))
        assert outputs(r)["label"]["data"] == [0, 2]

        two = {
            "inputs": [
                {"name": "petal_length", "datatype": "FP64", "shape": [2], "data": [1.4, 5.2]},
                {"name": "petal_width", "datatype": "FP64", "shape": [2], "data": [0.2, 2.3]},
            ]
        }
        r = await client.post("/v2/models/callable-iris/infer", json=two)
        assert outputs(r)["species"] == {
            "name": "species",
            "datatype": "BYTES",
            "shape": [2, 1],
            "parameters": {"content_type": "str"},
            "data": ["setosa", "virginica"],
        }

        # The metadata declared by load() in the worker is checked by the server ...
        wrong = body("x", "FP64", ROWS, outputs=[{"name": "transform"}])
        r = await client.post("/v2/models/sklearn-iris/infer", json=wrong)
        assert r.status_code == 400
        assert "unexpected inference output 'transform'" in r.json()["error"]
        # ... and a runtime's own BadRequest crosses the pool as a 400.
        uneven = {
            "parameters": {"content_type": "pd"},
            "inputs": [
                {"name": "a", "datatype": "FP64", "shape": [2], "data": [1.0, 2.0]},
                {"name": "b", "datatype": "FP64", "shape": [1], "data": [1.0]},
            ],
        }
        r = await client.post("/v2/models/sklearn-iris/infer", json=uneven)
        assert r.status_code == 400
        assert "input 'b' has 1 rows, the others 2" in r.json()["error"]
        unknown = body("x", "FP64", ROWS, parameters={"content_type": "parquet"})
        r = await client.post("/v2/models/sklearn-iris/infer", json=unknown)
        assert r.status_code == 400
        assert "unknown content type 'parquet'" in r.json()["error"]


async def test_metadata_read_by_load_reaches_the_parent(
    serve: Serve, example_repository: Path
) -> None:
    app = V2App(repository=example_repository / "onnx-iris")
    async with serve(app) as client:
        metadata = (await client.get("/v2/models/onnx-iris")).json()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [out["name"] for out in metadata["outputs"]] == ["label", "probabilities"]


async def test_metadata_read_by_load_in_process(serve: Serve, example_repository: Path) -> None:
    uri = str(example_repository / "onnx-iris" / "model.onnx")
    app = V2App([OnnxModel(name="onnx-iris", parameters={"uri": uri}, parallel_workers=0)])
    async with serve(app) as client:
        metadata = (await client.get("/v2/models/onnx-iris")).json()
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert [out["name"] for out in metadata["outputs"]] == ["label", "probabilities"]
        wrong = body("input", "FP64", ROWS)  # the declared FP32 is now enforced by the server
        r = await client.post("/v2/models/onnx-iris/infer", json=wrong)
        assert r.status_code == 400
        assert "datatype FP64 does not match the model's FP32" in r.json()["error"]
