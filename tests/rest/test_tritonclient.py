"""The real ``tritonclient.http`` against v2mount under a real uvicorn on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import uvicorn
from v2mount.types import DATATYPES

REPOSITORY = Path(__file__).parent / "repository"


def ready(address: str) -> bool:
    client = triton.InferenceServerClient(address)
    try:
        return bool(client.is_server_ready())
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        **os.environ,
        "V2MOUNT_MODEL_REPOSITORY": str(REPOSITORY),
        "PYTHONPATH": str(REPOSITORY),
    }
    log = tmp_path_factory.mktemp("uvicorn") / "server.log"
    args = ["v2mount:app", "--log-level", "warning"]
    with uvicorn(args, log, ready, within=60, env=env) as address:
        yield address


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server)
    yield client
    client.close()


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("echo")
    assert not client.is_model_ready("missing")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("scale")
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata("scale", model_version="1")["versions"] == ["1"]


NUMERIC = [datatype for datatype in DATATYPES if datatype != "BYTES"]


def _sample(datatype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if datatype == "BOOL":
        return rng.random((2, 3)) > 0.5
    if datatype == "BYTES":
        return np.array(
            [[b"a", b"\xff\x00raw", b""], ["\u00e9t\u00e9".encode(), b"x", b"yz"]], dtype=object
        )
    dtype = triton.triton_to_np_dtype(datatype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)
    return rng.normal(size=(2, 3)).astype(dtype)


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_round_trip_every_datatype(
    client: triton.InferenceServerClient, datatype: str, binary: bool
) -> None:
    data = _sample(datatype)
    if datatype == "BYTES" and not binary:
        data = np.array(
            [[b"a", b"b c", b""], ["\u00e9t\u00e9".encode(), b"x", b"yz"]], dtype=object
        )
    tensor = triton.InferInput("t", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = triton.InferRequestedOutput("t", binary_data=binary)
    result = client.infer("echo", [tensor], outputs=[output], request_id="r1")
    got = result.as_numpy("t")
    assert result.get_response()["id"] == "r1"
    if datatype == "BYTES":
        as_bytes = [x if isinstance(x, bytes) else x.encode() for x in got.ravel()]
        assert as_bytes == list(data.ravel())
    else:
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data)


def test_default_outputs_are_binary_and_mixed_inputs(client: triton.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = triton.InferInput("x", [2, 3], "FP32")
    a.set_data_from_numpy(x, binary_data=True)
    result = client.infer("scale", [a])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
    b = triton.InferInput("x", [2, 3], "FP32")
    b.set_data_from_numpy(x, binary_data=False)
    result = client.infer(
        "scale",
        [b],
        model_version="1",
        outputs=[triton.InferRequestedOutput("y", binary_data=False)],
    )
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)


def test_errors_surface_with_their_message(client: triton.InferenceServerClient) -> None:
    bad = triton.InferInput("x", [1, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException, match="does not match"):
        client.infer("scale", [bad])
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("missing")


def test_repository_extension(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert {entry["name"] for entry in index} >= {"echo", "scale"}
    client.unload_model("scale")
    assert not client.is_model_ready("scale")
    states = {e["name"]: e["state"] for e in client.get_model_repository_index()}
    assert states["scale"] == "UNAVAILABLE"
    client.load_model("scale")
    assert client.is_model_ready("scale")
    with pytest.raises(InferenceServerException, match="not in the model repository"):
        client.load_model("missing")


def test_statistics(client: triton.InferenceServerClient) -> None:
    x = triton.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 3), np.float32))
    client.infer("scale", [x])
    stats = client.get_inference_statistics("scale")
    entry = stats["model_stats"][0]
    assert entry["name"] == "scale" and entry["inference_count"] >= 1
    assert entry["inference_stats"]["success"]["count"] >= 1


@pytest.mark.parametrize("request_coding", ["gzip", "deflate", None])
@pytest.mark.parametrize("response_coding", ["gzip", "deflate", None])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_and_answers(
    client: triton.InferenceServerClient,
    request_coding: str | None,
    response_coding: str | None,
    binary: bool,
) -> None:
    """tritonclient's own compression options, both ways (answers of 1 KiB and more are
    compressed; tritonclient inflates them by their Content-Encoding)."""
    x = np.random.default_rng(3).normal(size=(200, 3)).astype(np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(
        "scale",
        [tensor],
        outputs=[triton.InferRequestedOutput("y", binary_data=binary)],
        request_compression_algorithm=request_coding,
        response_compression_algorithm=response_coding,
    )
    np.testing.assert_allclose(result.as_numpy("y"), x * 3, rtol=1e-6)
