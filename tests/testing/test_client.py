"""The numpy OIP clients against a served app: encoding, decoding, errors, raw access."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest

from v2mount import InferenceRequest, Model, Tensor
from v2mount.demo.models import Identity
from v2mount.testing import AsyncV2Client, V2HTTPError, connect_async

pytestmark = pytest.mark.anyio

AsyncFactory = Callable[..., Awaitable[AsyncV2Client]]

EVERY_DTYPE = {
    "b": np.array([True, False]),
    "u1": np.array([0, 255], np.uint8),
    "u2": np.array([0, 65535], np.uint16),
    "u4": np.array([0, 2**32 - 1], np.uint32),
    "u8": np.array([0, 2**64 - 1], np.uint64),
    "i1": np.array([-128, 127], np.int8),
    "i2": np.array([-(2**15), 2**15 - 1], np.int16),
    "i4": np.array([-(2**31), 2**31 - 1], np.int32),
    "i8": np.array([-(2**63), 2**53 + 1], np.int64),
    "f2": np.array([0.5, -2.0], np.float16),
    "f4": np.array([[0.1, 2.5e-8]], np.float32),
    "f8": np.array([[[1 / 3]]], np.float64),
}


class Scaler(Model):
    """Two declared outputs; echoes the request parameter ``factor`` into ``scaled``."""

    name = "scaler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [
        {"name": "scaled", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "total", "datatype": "FP64", "shape": [-1]},
    ]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        if payload.parameters.get("explode"):
            raise RuntimeError("the model exploded")
        x = payload["x"]
        return {"scaled": x * payload.parameters.get("factor", 1), "total": x.sum(axis=1)}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_every_numeric_datatype_round_trips(
    binary: bool, v2_async_client: AsyncFactory
) -> None:
    client = await v2_async_client(Identity)
    result = await client.infer("identity", EVERY_DTYPE, binary=binary)
    assert result.model_name == "identity" and result.model_version is None
    assert set(result.outputs) == set(EVERY_DTYPE)
    for name, sent in EVERY_DTYPE.items():
        got = result[name]
        assert got.dtype == sent.dtype and got.shape == sent.shape, name
        np.testing.assert_array_equal(got, sent)
        assert got.flags.writeable
    assert result.datatypes["u8"] == "UINT64" and result.datatypes["f2"] == "FP16"
    assert result.response is not None
    framed = "inference-header-content-length" in result.response.headers
    assert framed is binary


async def test_strings_go_as_bytes_and_non_utf8_needs_binary(v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client(Identity)
    result = await client.infer("identity", {"s": np.array([["héllo", ""]])})
    assert result.datatypes == {"s": "BYTES"} and result["s"].shape == (1, 2)
    assert result["s"].tolist() == [["héllo".encode(), b""]]
    raw = np.array([b"\xff\x00", b"ok"], dtype=object)
    binary = await client.infer("identity", {"s": raw}, binary=True)
    np.testing.assert_array_equal(binary["s"], raw)
    with pytest.raises(ValueError, match=r"input 's'.*not UTF-8"):
        await client.infer("identity", {"s": raw})
    with pytest.raises(TypeError, match=r"input 'o'.*object arrays must hold str or bytes"):
        await client.infer("identity", {"o": np.array([object()])})


async def test_a_tensor_value_sets_the_datatype(v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client(Identity)
    tensor = Tensor("ignored", "FP64", (3,), np.array([1, 2, 3]))
    result = await client.infer("identity", {"x": tensor, "w": [[1, 2]]})
    assert result.datatypes == {"x": "FP64", "w": "INT64"}
    assert result["x"].dtype == np.float64 and result["w"].tolist() == [[1, 2]]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_outputs_id_and_parameters(binary: bool, v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client(Scaler)
    x = np.array([[1, 2], [3, 4]], np.float32)
    result = await client.infer(
        "scaler", {"x": x}, outputs=["scaled"], parameters={"factor": 3}, id="r-1", binary=binary
    )
    assert result.id == "r-1" and list(result.outputs) == ["scaled"]
    np.testing.assert_array_equal(result["scaled"], x * 3)
    every = await client.infer("scaler", {"x": x})
    assert every.id and every.id != "r-1" and sorted(every.outputs) == ["scaled", "total"]
    np.testing.assert_array_equal(every["total"], [3.0, 7.0])


async def test_errors_carry_status_and_message(v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client(Scaler)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "nobody"}, 404, "model 'nobody' not found"),
        ({"inputs": {"x": Tensor("x", "FP64", (1, 2), np.ones((1, 2)))}}, 400, "FP64"),
        ({"inputs": {"x": np.ones((1, 3), np.float32)}}, 400, "shape"),
        ({"parameters": {"explode": True}}, 500, "the model exploded"),
    ]
    for case, status, text in cases:
        with pytest.raises(V2HTTPError) as caught:
            await client.infer(
                case.get("model", "scaler"),
                case.get("inputs", {"x": np.ones((1, 2), np.float32)}),
                parameters=case.get("parameters"),
            )
        assert caught.value.status_code == status and text in caught.value.error, case
        assert f"/v2/models/{case.get('model', 'scaler')}/infer: {status}" in str(caught.value)
    with pytest.raises(V2HTTPError) as missing:
        await client.metadata("nobody")
    assert missing.value.status_code == 404
    with pytest.raises(ValueError, match="at least one input"):
        await client.infer("scaler", {})


async def test_inputs_are_cast_to_the_declared_datatype_of_the_same_kind(
    v2_async_client: AsyncFactory,
) -> None:
    client = await v2_async_client([Scaler, Identity])
    result = await client.infer("scaler", {"x": np.ones((2, 2))})  # float64 in
    assert result["scaled"].dtype == np.float32 and result["total"].tolist() == [2.0, 2.0]
    with pytest.raises(V2HTTPError, match="FP64 does not match the model's FP32"):
        await client.infer("scaler", {"x": np.ones((2, 2))}, cast=False)
    undeclared = await client.infer("identity", {"x": np.ones(2)})
    assert undeclared.datatypes == {"x": "FP64"}


async def test_metadata_readiness_index_and_raw_requests(v2_async_client: AsyncFactory) -> None:
    client = await v2_async_client([Scaler, Identity])
    assert await client.live() and await client.ready()
    assert await client.ready("scaler") and not await client.ready("nobody")
    server = await client.metadata()
    assert server["name"] == "v2mount" and "binary_tensor_data" in server["extensions"]
    model = await client.metadata("scaler")
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    index = await client.repository_index(ready=True)
    assert sorted(entry["name"] for entry in index) == ["identity", "scaler"]
    raw = await client.post("/v2/models/scaler/infer", content=b"{nope")
    assert raw.status_code == 400 and "malformed JSON" in raw.json()["error"]
    assert (await client.get("/v2/models/scaler/versions/7")).status_code == 404


def test_the_sync_client_mirrors_the_async_one(v2_client: Callable[..., Any]) -> None:
    client = v2_client(Scaler, backend="trio")
    result = client.infer("scaler", {"x": [[1.0, 2.0]]}, outputs=["total"], id="a")
    assert result.id == "a" and result["total"].tolist() == [3.0]
    assert client.live() and client.ready() and client.ready("scaler")
    assert client.metadata()["name"] == "v2mount"
    assert client.metadata("scaler")["name"] == "scaler"
    assert client.repository_index()[0]["state"] == "READY"
    assert client.get("/v2/health/live").status_code == 200
    assert client.post("/v2/models/scaler/infer", content=b"[]").status_code == 400
    with pytest.raises(V2HTTPError, match="404"):
        client.infer("nobody", {"x": [[1.0, 2.0]]})


@pytest.mark.parametrize("prefix", ["ml", "/ml/"])
def test_a_prefix_must_be_a_clean_path(prefix: str) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        AsyncV2Client(httpx.AsyncClient(), prefix)


async def test_connect_needs_an_http_url() -> None:
    with pytest.raises(ValueError, match="expected an http"):
        async with connect_async("127.0.0.1:8000"):
            pass


def test_connect_without_httpx_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n"
        "    from v2mount.testing import connect\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "v2mount.testing.connect needs httpx: pip install 'v2mount[testing]'"
    )
