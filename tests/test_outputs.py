"""Answers checked against the declared metadata: outputs, input conversions, the id."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import numpy as np
import pytest

from v2mount import InferenceRequest, InferenceResponse, Model, Tensor, V2App
from v2mount.codecs.content import encode_output
from v2mount.errors import BadRequest, ModelError
from v2mount.metadata import validate_request
from v2mount.model import build_response

pytestmark = pytest.mark.anyio

Serve = Callable[[V2App], AbstractAsyncContextManager[httpx.AsyncClient]]


class Fixed(Model):
    """Returns whatever it was built with, for outputs declared by the test."""

    def __init__(self, result: Any, **fields: Any) -> None:
        super().__init__(**fields)
        self.result = result

    def predict(self, payload: InferenceRequest) -> Any:
        return self.result


def respond(result: Any, *outputs: dict[str, Any]) -> InferenceResponse:
    model = Fixed(result, name="m", outputs=list(outputs))
    request = InferenceRequest([Tensor("x", "FP32", (1,), np.zeros(1, np.float32))], id="r")
    return build_response(model, request, model.predict(request))


def declared(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def test_a_1d_answer_declared_n_by_1_is_answered_n_by_1() -> None:
    (y,) = respond(np.arange(5), declared("y", "INT64", [-1, 1])).outputs
    assert (y.shape, y.data.shape, y.data.ravel().tolist()) == ((5, 1), (5, 1), [0, 1, 2, 3, 4])


def test_declared_shapes_and_names_are_checked() -> None:
    with pytest.raises(ModelError, match=r"model 'm': output 'y' has shape \[5, 7\], which "):
        respond({"y": np.ones((5, 7))}, declared("y", "FP64", [-1, 2]))
    with pytest.raises(ModelError, match="returned output 'z', which it does not declare"):
        respond({"z": np.ones((5, 2))}, declared("y", "FP64", [-1, 2]))
    (y,) = respond({"y": np.ones((5, 2))}, declared("y", "FP64", [-1, 2])).outputs
    assert y.shape == (5, 2)
    # Nothing declared: anything goes, as before.
    (free,) = respond({"z": np.ones((5, 7))}).outputs
    assert (free.name, free.datatype, free.shape) == ("z", "FP64", (5, 7))


CASTS = [
    # (values, their dtype, declared datatype, accepted?)
    ([1.5, -2.0], "float32", "FP64", True),  # wider float
    ([1, 2], "int32", "INT64", True),  # wider int
    ([0, 1, 2], "int64", "UINT8", True),  # every value fits
    ([0, 300], "int64", "UINT8", False),  # 300 would wrap
    ([-1, 2], "int64", "UINT32", False),  # the sign would go
    ([1, 2], "int64", "FP32", True),  # exact in FP32
    ([2**40 + 1], "int64", "FP32", False),  # not exact in FP32
    ([0.1, 0.2], "float64", "FP32", True),  # rounding is what declaring FP32 asks for
    ([1e300], "float64", "FP32", False),  # overflow to infinity
    ([1.0, 2.0], "float64", "INT64", True),  # integral floats
    ([1.5], "float64", "INT64", False),  # a fraction would go
    ([0, 1], "int64", "BOOL", True),
    ([2], "int64", "BOOL", False),
]


@pytest.mark.parametrize(("values", "dtype", "datatype", "accepted"), CASTS)
def test_one_casting_rule_for_declared_outputs(
    values: list[Any], dtype: str, datatype: str, accepted: bool
) -> None:
    array = np.array(values, dtype=dtype)
    spec = declared("y", datatype, [-1])
    paths: list[Callable[[], Tensor]] = [
        lambda: respond({"y": array}, spec).outputs[0],  # a Model's predict
        lambda: encode_output("y", array, datatype=datatype),  # the runtimes' encoder
    ]
    for path in paths:
        if accepted:
            tensor = path()
            assert tensor.datatype == datatype
            np.testing.assert_allclose(tensor.data.astype(float), array.astype(float), rtol=1e-6)
        else:
            with pytest.raises(ModelError, match=f"does not convert to the declared {datatype}"):
                path()


def test_an_inference_response_whose_tensors_hold_lists() -> None:
    model = Fixed(None, name="m")
    request = InferenceRequest([Tensor("x", "FP32", (1,), np.zeros(1, np.float32))])
    result = InferenceResponse(
        "m",
        [
            Tensor("n", "FP32", (2, 2), [[1.0, 2.0], [3.0, 4.0]]),  # type: ignore[arg-type]
            Tensor("s", "BYTES", (2,), ["a", "b"]),  # type: ignore[arg-type]
        ],
    )
    n, s = build_response(model, request, result).outputs
    assert (n.data.dtype, n.data.tolist()) == (np.float32, [[1.0, 2.0], [3.0, 4.0]])
    assert s.data.tolist() == [b"a", b"b"]
    with pytest.raises(ModelError, match=r"output 'bad': its data is not FP32 of shape \[3\]"):
        bad = Tensor("bad", "FP32", (3,), [1.0, 2.0])  # type: ignore[arg-type]
        build_response(model, request, InferenceResponse("m", [bad]))


class Typed(Model):
    name = "typed"
    inputs = [
        {"name": "f", "datatype": "FP64", "shape": [-1]},
        {"name": "i", "datatype": "INT64", "shape": [-1], "optional": True},
    ]

    def predict(self, payload: InferenceRequest) -> Any:
        return {name: np.array([str(payload[name].dtype)]) for name in payload}


def tensor(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}


async def test_lossless_input_conversions_are_made_and_lossy_ones_refused(
    serve: Serve,
) -> None:
    async with serve(V2App([Typed()], model_parallel_workers=0)) as client:
        body = {"inputs": [tensor("f", "FP32", [1.5]), tensor("i", "INT32", [7])]}
        answer = await client.post("/v2/models/typed/infer", json=body)
        assert answer.status_code == 200, answer.text
        seen = {out["name"]: out["data"] for out in answer.json()["outputs"]}
        assert seen == {"f": ["float64"], "i": ["int64"]}  # the model sees what it declared
        for bad in (tensor("f", "BYTES", ["1"]), tensor("i", "FP32", [1.0])):
            body = {"inputs": [bad] if bad["name"] == "f" else [tensor("f", "FP64", [1.0]), bad]}
            answer = await client.post("/v2/models/typed/infer", json=body)
            assert answer.status_code == 400
            assert (
                f"input {bad['name']!r}: datatype {bad['datatype']} does not match"
                in (answer.json()["error"])
            )
        lossy = {"inputs": [tensor("f", "FP64", [1.0]), tensor("i", "UINT64", [1])]}
        assert (await client.post("/v2/models/typed/infer", json=lossy)).status_code == 400


def test_any_input_name_only_for_models_that_take_it() -> None:
    model = Typed(name="one", inputs=[{"name": "features", "datatype": "FP64", "shape": [-1]}])
    request = InferenceRequest([Tensor("x", "FP64", (1,), np.zeros(1))])
    with pytest.raises(BadRequest, match="unexpected inference input 'x'"):
        validate_request(model.settings, request)
    validate_request(model.settings, request, any_input_name=True)
    assert request.inputs[0].name == "features"


async def test_every_response_carries_an_id(serve: Serve) -> None:
    async with serve(V2App([Typed()], model_parallel_workers=0)) as client:
        body = {"inputs": [tensor("f", "FP64", [1.0])]}
        given = await client.post("/v2/models/typed/infer", json={**body, "id": "mine"})
        assert given.json()["id"] == "mine"
        first = (await client.post("/v2/models/typed/infer", json=body)).json()["id"]
        second = (await client.post("/v2/models/typed/infer", json=body)).json()["id"]
        assert uuid.UUID(first).version == 4 and first != second
