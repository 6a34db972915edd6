"""gRPC test helpers: the app runs on the test's loop (asyncio or trio), clients in threads.

grpcio's clients block (or need asyncio), so every call goes through ``call``, which
runs it in a worker thread: the app's loop stays free to answer it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from v2mount import V2App
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from v2mount.grpc.proto import triton_extensions_pb2_grpc as ext_grpc

T = TypeVar("T")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking client call in a worker thread."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))


class Clients:
    """A plain grpcio stub (both services) and a ``tritonclient.grpc`` client for one app."""

    def __init__(self, app: V2App) -> None:
        assert app.grpc is not None and app.grpc.port is not None
        self.target = f"127.0.0.1:{app.grpc.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.extensions = ext_grpc.GRPCInferenceServiceStub(self.channel)
        self.triton = triton.InferenceServerClient(self.target)

    def close(self) -> None:
        self.triton.close()
        self.channel.close()


@asynccontextmanager
async def serving(app: V2App) -> AsyncIterator[Clients]:
    """The app started (its gRPC server too), with clients connected to it."""
    async with app.lifespan():
        clients = Clients(app)
        try:
            yield clients
        finally:
            clients.close()


def raw_request(model: str, **arrays: np.ndarray[Any, Any]) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``arrays`` as raw_input_contents (numeric only)."""
    request = pb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=_DATATYPE[array.dtype.str], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


_DATATYPE = {"|b1": "BOOL", "<f4": "FP32", "<f8": "FP64", "<i8": "INT64", "<i4": "INT32"}


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The ``grpc.RpcError`` that a blocking call raises (fails the test if none)."""
    with pytest.raises(grpc.RpcError) as caught:
        fn(*args, **kwargs)
    return caught.value
