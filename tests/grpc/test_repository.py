"""Triton's repository and statistics RPCs over gRPC, through tritonclient and stubs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.grpc.conftest import call, raw_request, rpc_error, serving
from v2mount import V2App
from v2mount.grpc.proto import triton_extensions_pb2 as ext

pytestmark = pytest.mark.anyio


def repository(root: Path) -> Path:
    for name in ("identity", "mirror"):
        folder = root / name
        folder.mkdir()
        settings = {"name": name, "implementation": "v2mount.demo.models.Identity"}
        (folder / "model-settings.json").write_text(json.dumps({**settings, "parallel_workers": 0}))
    return root


def make_app(root: Path, **overrides: Any) -> V2App:
    return V2App(repository=repository(root), grpc_port=0, **overrides)


def x_input() -> triton.InferInput:
    tensor = triton.InferInput("x", [3, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((3, 1), dtype=np.float32))
    return tensor


async def test_index_unload_and_load_through_tritonclient(tmp_path: Path) -> None:
    async with serving(make_app(tmp_path)) as clients:
        client = clients.triton
        index = await call(client.get_model_repository_index, as_json=True)
        assert [(m["name"], m["state"]) for m in index["models"]] == [
            ("identity", "READY"),
            ("mirror", "READY"),
        ]
        await call(client.unload_model, "mirror")
        assert not await call(client.is_model_ready, "mirror")
        with pytest.raises(InferenceServerException, match="not ready") as caught:
            await call(client.infer, "mirror", [x_input()])
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        index = await call(client.get_model_repository_index, as_json=True)
        assert {m["name"]: m["state"] for m in index["models"]}["mirror"] == "UNAVAILABLE"
        ready = await call(
            clients.extensions.RepositoryIndex, ext.RepositoryIndexRequest(ready=True)
        )
        assert [m.name for m in ready.models] == ["identity"]

        await call(client.load_model, "mirror")
        assert await call(client.is_model_ready, "mirror")
        result = await call(client.infer, "mirror", [x_input()])
        assert result.as_numpy("x").tolist() == [[1.0], [1.0], [1.0]]


async def test_repository_errors(tmp_path: Path) -> None:
    async with serving(make_app(tmp_path)) as clients:
        load = ext.RepositoryModelLoadRequest(model_name="absent")
        error = await call(rpc_error, clients.extensions.RepositoryModelLoad, load)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "not in the model repository" in error.details()
        bad = ext.RepositoryModelUnloadRequest(model_name="../identity")
        error = await call(rpc_error, clients.extensions.RepositoryModelUnload, bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_disabled_repository_is_permission_denied(tmp_path: Path) -> None:
    async with serving(make_app(tmp_path, repository_api_enabled=False)) as clients:
        with pytest.raises(InferenceServerException, match="disabled") as caught:
            await call(clients.triton.get_model_repository_index)
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
        assert await call(clients.triton.is_model_ready, "identity")


async def test_mlserver_repository_service_name(tmp_path: Path) -> None:
    """MLServer's older ``inference.model_repository.ModelRepositoryService`` works too."""
    async with serving(make_app(tmp_path)) as clients:
        method = clients.channel.unary_unary(
            "/inference.model_repository.ModelRepositoryService/RepositoryIndex",
            request_serializer=ext.RepositoryIndexRequest.SerializeToString,
            response_deserializer=ext.RepositoryIndexResponse.FromString,
        )
        index = await call(method, ext.RepositoryIndexRequest())
        assert [m.name for m in index.models] == ["identity", "mirror"]


async def test_statistics_count_grpc_inferences(tmp_path: Path) -> None:
    async with serving(make_app(tmp_path)) as clients:
        client = clients.triton
        await call(client.infer, "identity", [x_input()])
        await call(client.infer, "identity", [x_input()])
        request = raw_request("identity", x=np.ones(2, dtype=np.float32))
        request.inputs[0].datatype = "FP64"  # 8 bytes for 2 x FP64: refused in decoding
        await call(rpc_error, clients.stub.ModelInfer, request)

        stats = await call(client.get_inference_statistics, "identity", as_json=True)
        (entry,) = stats["model_stats"]
        assert entry["name"] == "identity"
        assert int(entry["inference_count"]) == 6
        assert int(entry["execution_count"]) == 2
        inference = entry["inference_stats"]
        assert int(inference["success"]["count"]) == 2
        assert int(inference["compute_input"]["count"]) == 2
        assert int(inference["compute_output"]["count"]) == 2
        assert int(entry["last_inference"]) > 0

        everything = await call(client.get_inference_statistics, as_json=True)
        assert sorted(m["name"] for m in everything["model_stats"]) == ["identity", "mirror"]
        with pytest.raises(InferenceServerException, match="not found") as caught:
            await call(client.get_inference_statistics, "absent")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
