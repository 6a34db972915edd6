"""The gRPC dataplane through ``tritonclient.grpc`` and a plain grpcio stub, on asyncio
and trio hosts: health, metadata, inference with raw and typed contents, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.grpc.conftest import call, raw_request, rpc_error, serving
from v2mount import V2App
from v2mount.demo.models import Identity
from v2mount.grpc._service import InferenceService
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.grpc.proto import triton_extensions_pb2 as ext
from v2mount.model import Model
from v2mount.settings import ModelSettings
from v2mount.standalone import DEMO_REPOSITORY
from v2mount.types import DATATYPES, InferenceRequest, InferenceResponse, Tensor

pytestmark = pytest.mark.anyio

WEIGHTS = DEMO_REPOSITORY / "linear" / "1" / "weights.npz"


class Broken(Model):
    def predict(self, payload: InferenceRequest) -> Any:
        raise ValueError("the model is broken")


class ParameterEcho(Model):
    """Echoes ``x``, with the request's parameters and ``x``'s as response parameters."""

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = payload.input("x")
        output = Tensor("x", x.datatype, x.shape, x.data, dict(x.parameters))
        return InferenceResponse("", [output], parameters=dict(payload.parameters))


class Extras(Model):
    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = payload.input("x")
        parameters = {"ratio": 0.5, "huge": 2**70, "small": -(2**63)}
        return InferenceResponse("", [x], parameters=parameters)


class Half(Model):
    """Returns ``x`` and ``x / 2`` as FP16."""

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"x": payload["x"], "h": (payload["x"] / 2).astype(np.float16)}


def linear_settings(workers: int = 0) -> ModelSettings:
    return ModelSettings(
        name="linear",
        implementation="v2mount.demo.models.LinearClassifier",
        parameters={"uri": str(WEIGHTS), "version": "1"},
        parallel_workers=workers,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        outputs=[
            {"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    )


def make_app(*models: Model | ModelSettings, **overrides: Any) -> V2App:
    if not models:
        models = (Identity(ModelSettings(name="identity", parallel_workers=0)),)
    return V2App(list(models), grpc_port=0, **{"model_parallel_workers": 0, **overrides})


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray[Any, Any]:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"é{i}".encode() for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    numpy_dtype = np.dtype(
        {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.get(datatype, datatype.lower())
    )
    if numpy_dtype.kind == "f":
        return (np.arange(count) - 2.25).astype(numpy_dtype).reshape(shape)
    info = np.iinfo(numpy_dtype)  # the extremes must survive exactly
    values = [int(info.min), int(info.max), *range(count - 2)]
    return np.array(values, dtype=numpy_dtype).reshape(shape)


async def test_health_and_metadata_through_tritonclient() -> None:
    async with serving(make_app(linear_settings())) as clients:
        client = clients.triton
        assert await call(client.is_server_live)
        assert await call(client.is_server_ready)
        assert await call(client.is_model_ready, "linear")
        assert await call(client.is_model_ready, "linear", "1")
        assert not await call(client.is_model_ready, "linear", "9")
        assert not await call(client.is_model_ready, "unknown")
        server = await call(client.get_server_metadata, as_json=True)
        assert server["name"] == "v2mount"
        assert "model_repository" in server["extensions"]
        metadata = await call(client.get_model_metadata, "linear", as_json=True)
        assert metadata["name"] == "linear"
        assert metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
        assert [o["name"] for o in metadata["outputs"]] == ["scores", "label"]
        with pytest.raises(InferenceServerException, match="not found"):
            await call(client.get_model_metadata, "unknown")


async def test_every_datatype_round_trips_as_raw_contents_through_tritonclient() -> None:
    async with serving(make_app()) as clients:
        inputs, expected = [], {}
        for datatype in DATATYPES:
            array = sample(datatype)
            tensor = triton.InferInput(f"in_{datatype}", list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
            expected[f"in_{datatype}"] = (datatype, array)
        result = await call(clients.triton.infer, "identity", inputs, request_id="r-1")
        response = result.get_response()
        assert response.id == "r-1"
        assert response.model_name == "identity"
        assert len(response.raw_output_contents) == len(DATATYPES)
        for name, (datatype, array) in expected.items():
            assert result.get_output(name).datatype == datatype
            got = result.as_numpy(name)
            assert got.shape == array.shape
            assert got.tolist() == array.tolist(), datatype


async def test_typed_contents_through_tritonclient() -> None:
    """tritonclient sends typed contents when the tensor's proto is filled directly."""
    async with serving(make_app()) as clients:
        tensor = triton.InferInput("x", [2, 2], "FP32")
        tensor._get_tensor().contents.fp32_contents.extend([1.5, -2.0, 3.25, 0.0])
        result = await call(clients.triton.infer, "identity", [tensor])
        response = result.get_response()
        assert not response.raw_output_contents
        assert list(response.outputs[0].contents.fp32_contents) == [1.5, -2.0, 3.25, 0.0]
        assert list(response.outputs[0].shape) == [2, 2]


_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


async def test_every_typed_datatype_round_trips_through_a_plain_stub() -> None:
    async with serving(make_app()) as clients:
        request = pb.ModelInferRequest(model_name="identity", id="typed")
        for datatype, field in _FIELDS.items():
            array = sample(datatype)
            tensor = request.inputs.add(name=datatype, datatype=datatype, shape=array.shape)
            getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
        response = await call(clients.stub.ModelInfer, request)
        assert response.id == "typed"
        assert not response.raw_output_contents
        outputs = {output.name: output for output in response.outputs}
        for datatype, field in _FIELDS.items():
            output = outputs[datatype]
            assert output.datatype == datatype
            assert list(output.shape) == [2, 3]
            got = list(getattr(output.contents, field))
            want = sample(datatype).reshape(-1).tolist()
            if datatype == "FP32":
                assert np.array(got, dtype=np.float32).tolist() == want
            else:
                assert got == want, datatype


async def test_raw_fp16_and_a_typed_request_with_an_fp16_output() -> None:
    """FP16 has no typed field: typed FP16 input is refused, and an FP16 output makes
    the whole response raw."""
    async with serving(make_app()) as clients:
        typed = pb.ModelInferRequest(model_name="identity")
        typed.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
        error = await call(rpc_error, clients.stub.ModelInfer, typed)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents" in error.details()

        half = np.array([0.5, -1.0], dtype="<f2")
        raw = pb.ModelInferRequest(model_name="identity")
        raw.inputs.add(name="h", datatype="FP16", shape=half.shape)
        raw.raw_input_contents.append(half.tobytes())
        response = await call(clients.stub.ModelInfer, raw)
        assert np.frombuffer(response.raw_output_contents[0], dtype="<f2").tolist() == [0.5, -1.0]

    async with serving(make_app(Half(ModelSettings(name="half")))) as clients:
        typed = pb.ModelInferRequest(model_name="half")
        typed.inputs.add(name="x", datatype="INT32", shape=[2]).contents.int_contents.extend([4, 5])
        response = await call(clients.stub.ModelInfer, typed)
        assert [o.datatype for o in response.outputs] == ["INT32", "FP16"]
        assert np.frombuffer(response.raw_output_contents[0], "<i4").tolist() == [4, 5]
        assert np.frombuffer(response.raw_output_contents[1], "<f2").tolist() == [2.0, 2.5]


async def test_parameters_travel_both_ways() -> None:
    async with serving(make_app(ParameterEcho(ModelSettings(name="echo")))) as clients:
        request = raw_request("echo", x=np.array([1.0, 2.0], dtype=np.float32))
        request.parameters["flag"].bool_param = True
        request.parameters["count"].int64_param = 7
        request.parameters["text"].string_param = "hello"
        request.inputs[0].parameters["tag"].string_param = "input-tag"
        response = await call(clients.stub.ModelInfer, request)
        parameters = response.parameters
        assert parameters["flag"].bool_param is True
        assert parameters["count"].int64_param == 7
        assert parameters["text"].string_param == "hello"
        assert response.outputs[0].parameters["tag"].string_param == "input-tag"


async def test_tritonclients_double_and_uint64_parameters_reach_the_model() -> None:
    """tritonclient sends floats as Triton's double_param, unknown to the spec's proto."""
    async with serving(make_app(ParameterEcho(ModelSettings(name="echo")))) as clients:
        x = triton.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.ones(1, dtype=np.float32))
        parameters = {"ratio": 0.25, "label": "a", "n": 3, "flag": False}
        result = await call(clients.triton.infer, "echo", [x], parameters=parameters)
        echoed = result.get_response().parameters
        assert echoed["ratio"].string_param == "0.25"  # back as text: the spec has no double
        assert echoed["label"].string_param == "a"
        assert echoed["n"].int64_param == 3
        assert echoed["flag"].bool_param is False


async def test_response_parameters_the_spec_cannot_type_go_as_text() -> None:
    """The spec's InferParameter holds bool, int64 and string only."""
    async with serving(make_app(Extras(ModelSettings(name="extras")))) as clients:
        response = await call(clients.stub.ModelInfer, raw_request("extras", x=np.ones(1)))
        parameters = response.parameters
        assert parameters["ratio"].string_param == "0.5"
        assert parameters["huge"].string_param == str(2**70)
        assert parameters["small"].int64_param == -(2**63)


async def test_requested_outputs_are_the_only_ones_returned() -> None:
    async with serving(make_app(linear_settings())) as clients:
        x = triton.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
        outputs = [triton.InferRequestedOutput("label")]
        result = await call(clients.triton.infer, "linear", [x], outputs=outputs)
        assert [o.name for o in result.get_response().outputs] == ["label"]
        assert result.as_numpy("label").dtype == np.int64
        bad = [triton.InferRequestedOutput("nope")]
        with pytest.raises(InferenceServerException, match="unexpected inference output"):
            await call(clients.triton.infer, "linear", [x], outputs=bad)


@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        (lambda r: setattr(r, "model_name", "unknown"), "NOT_FOUND", "not found"),
        (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "no version"),
        (lambda r: setattr(r.inputs[0], "datatype", "FLOAT"), "INVALID_ARGUMENT", "datatype"),
        (lambda r: r.raw_input_contents.__setitem__(0, bytes(8)), "INVALID_ARGUMENT", "needs 16"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -1), "INVALID_ARGUMENT", "non-negative"),
        (lambda r: r.raw_input_contents.append(b""), "INVALID_ARGUMENT", "every input"),
        (
            lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
            "INVALID_ARGUMENT",
            "sets 'contents'",
        ),
        (lambda r: r.ClearField("inputs"), "INVALID_ARGUMENT", "non-empty"),
        (lambda r: setattr(r.inputs[0], "name", "y"), "INVALID_ARGUMENT", "unexpected inference"),
    ],
)
async def test_a_bad_request_gets_its_status_and_the_server_stays_up(
    mutate: Any, code: str, text: str
) -> None:
    async with serving(make_app(linear_settings())) as clients:
        request = raw_request("linear", x=np.ones((1, 4), dtype=np.float32))
        request.model_version = "1"
        mutate(request)
        error = await call(rpc_error, clients.stub.ModelInfer, request)
        assert error.code() == getattr(grpc.StatusCode, code)
        assert text in error.details()
        assert "Traceback" not in error.details()
        assert (await call(clients.stub.ServerLive, pb.ServerLiveRequest())).live


async def test_a_malformed_message_is_invalid_argument_and_harmless() -> None:
    async with serving(make_app()) as clients:
        method = clients.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 64, b"\x2a\x05\x0a\x03"):
            error = await call(rpc_error, method, garbage)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed ModelInferRequest" in error.details()
        unknown = clients.channel.unary_unary("/inference.GRPCInferenceService/Nope")
        assert (await call(rpc_error, unknown, b"")).code() == grpc.StatusCode.UNIMPLEMENTED
        assert (await call(clients.stub.ServerLive, pb.ServerLiveRequest())).live
        response = await call(
            clients.stub.ModelInfer, raw_request("identity", x=np.arange(3.0, dtype=np.float32))
        )
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]


async def test_a_failing_model_is_internal_without_a_traceback() -> None:
    async with serving(make_app(Broken(ModelSettings(name="broken")))) as clients:
        request = raw_request("broken", x=np.ones(2, dtype=np.float32))
        error = await call(rpc_error, clients.stub.ModelInfer, request)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "ValueError: the model is broken"


async def test_rest_and_grpc_answer_the_same_model_identically() -> None:
    """One model in a worker pool, loaded once, asked the same question both ways."""
    app = make_app(linear_settings(workers=1))
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    async with serving(app) as clients:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as rest:
            body = {
                "id": "same",
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}
                ],
            }
            answer = (await rest.post("/v2/models/linear/infer", json=body)).json()
        raw = await call(clients.stub.ModelInfer, raw_request("linear", x=x))
        typed_request = pb.ModelInferRequest(model_name="linear", id="same")
        tensor = typed_request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        typed = await call(clients.stub.ModelInfer, typed_request)
        assert len(app.registry.versions("linear")) == 1
    assert typed.model_name == raw.model_name == answer["model_name"] == "linear"
    assert typed.model_version == raw.model_version == answer["model_version"] == "1"
    assert typed.id == answer["id"] == "same"
    for index, output in enumerate(answer["outputs"]):
        for response in (raw, typed):
            assert response.outputs[index].name == output["name"]
            assert response.outputs[index].datatype == output["datatype"]
            assert list(response.outputs[index].shape) == output["shape"]
        dtype = np.float32 if output["datatype"] == "FP32" else np.int64
        from_raw = np.frombuffer(raw.raw_output_contents[index], dtype=dtype)
        field = "fp32_contents" if dtype is np.float32 else "int64_contents"
        from_typed = np.array(getattr(typed.outputs[index].contents, field), dtype=dtype)
        from_rest = np.array(output["data"], dtype=dtype)
        assert from_raw.tolist() == from_typed.tolist() == from_rest.tolist()


async def test_calls_are_counted_by_method_and_code() -> None:
    app = make_app()
    async with serving(app) as clients:
        await call(clients.stub.ServerLive, pb.ServerLiveRequest())
        request = raw_request("identity", x=np.ones(1, dtype=np.float32))
        await call(clients.stub.ModelInfer, request)
        request.model_name = "unknown"
        await call(rpc_error, clients.stub.ModelInfer, request)
    registry = app.metrics.registry
    service = "inference.GRPCInferenceService"

    def value(name: str, method: str, **labels: str) -> float | None:
        return registry.get_sample_value(
            name, {"grpc_type": "UNARY", "grpc_service": service, "grpc_method": method, **labels}
        )

    assert value("grpc_server_started_total", "ModelInfer") == 2
    assert value("grpc_server_handled_total", "ModelInfer", grpc_code="OK") == 1
    assert value("grpc_server_handled_total", "ModelInfer", grpc_code="NOT_FOUND") == 1
    assert value("grpc_server_handled_total", "ServerLive", grpc_code="OK") == 1
    assert value("grpc_server_handling_seconds_count", "ModelInfer") == 2


def test_every_rpc_of_both_protos_is_implemented(tmp_path: Path) -> None:
    implemented = set(InferenceService(V2App([], grpc_port=0)).rpcs())
    declared = {
        method.name
        for module in (pb, ext)
        for method in module.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
    assert declared == implemented


async def test_a_message_above_the_limit_is_resource_exhausted() -> None:
    async with serving(make_app(grpc_max_message_length=4096)) as clients:
        big = raw_request("identity", x=np.zeros(2048, dtype=np.float32))
        error = await call(rpc_error, clients.stub.ModelInfer, big)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = raw_request("identity", x=np.zeros(16, dtype=np.float32))
        assert len((await call(clients.stub.ModelInfer, small)).raw_output_contents[0]) == 64


async def test_large_typed_contents_round_trip() -> None:
    """Large typed tensors are converted in a worker thread: same answer."""
    values = np.linspace(-1, 1, 100_000, dtype=np.float32)
    async with serving(make_app()) as clients:
        request = pb.ModelInferRequest(model_name="identity")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[100_000])
        tensor.contents.fp32_contents.extend(values.tolist())
        response = await call(clients.stub.ModelInfer, request)
        got = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32)
        assert np.array_equal(got, values)


async def test_many_concurrent_calls_all_answer() -> None:
    """64 calls in flight at once (through the trio bridge on trio), each its own answer."""
    async with serving(make_app()) as clients:
        futures = [
            clients.stub.ModelInfer.future(raw_request("identity", x=np.full(3, i, np.float32)))
            for i in range(64)
        ]
        for i, future in enumerate(futures):
            response = await call(future.result, timeout=60)
            assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [i] * 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # tritonclient's aio client is asyncio
async def test_tritonclient_aio_client_on_the_hosts_own_loop() -> None:
    """The client and the server share one asyncio loop: nothing may block it."""
    import tritonclient.grpc.aio as triton_aio

    app = make_app()
    async with app.lifespan():
        assert app.grpc is not None
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{app.grpc.port}")
        try:
            assert await client.is_model_ready("identity")
            x = triton_aio.InferInput("x", [2], "INT64")
            x.set_data_from_numpy(np.array([7, -7], dtype=np.int64))
            result = await client.infer("identity", [x])
            assert result.as_numpy("x").tolist() == [7, -7]
        finally:
            await client.close()
