"""Client cancellation and deadlines reach the model and the batcher; full queues and
server-side timeouts get their status codes."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import grpc
import numpy as np
import pytest

from tests.grpc.conftest import call, raw_request, rpc_error, serving
from tests.support import eventually
from v2mount import V2App
from v2mount.demo.models import Identity
from v2mount.model import Model
from v2mount.settings import ModelSettings
from v2mount.types import InferenceRequest

pytestmark = pytest.mark.anyio


class Gate(Model):
    """Echoes ``x`` once ``release`` is set; records entering and being cancelled."""

    def arm(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()

    async def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.entered.set()
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        return {"x": payload["x"]}


def gate(**settings: Any) -> Gate:
    model = Gate(ModelSettings(name="gate", parallel_workers=0, **settings))
    model.arm()
    return model


def request() -> Any:
    return raw_request("gate", x=np.ones(2, dtype=np.float32))


#: Waits for observable state (the test's own timeout guards it).
until = partial(eventually, seconds=60.0, interval=0.01)


def handled(app: V2App, code: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "UNARY",
            "grpc_service": "inference.GRPCInferenceService",
            "grpc_method": "ModelInfer",
            "grpc_code": code,
        },
    )
    return value or 0.0


async def test_a_client_cancel_cancels_the_model_call() -> None:
    model = gate()
    app = V2App([model], grpc_port=0)
    async with serving(app) as clients:
        future = clients.stub.ModelInfer.future(request())
        with anyio.fail_after(60):
            await model.entered.wait()
            future.cancel()
            await model.cancelled.wait()
        await until(lambda: handled(app, "CANCELLED") == 1)
        stats = app.registry.get("gate").runner_statistics()
        assert stats is not None and stats.in_flight == 0
        model.release.set()
        response = await call(clients.stub.ModelInfer, request())
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [1, 1]


async def test_a_passed_deadline_is_deadline_exceeded_and_leaves_nothing_behind() -> None:
    model = gate()
    app = V2App([model], grpc_port=0)
    async with serving(app) as clients:
        error = await call(rpc_error, clients.stub.ModelInfer, request(), timeout=1.0)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The client's timer may fire before the server's: then the server sees a cancel.
        await until(lambda: handled(app, "DEADLINE_EXCEEDED") + handled(app, "CANCELLED") == 1)
        await until(lambda: app.registry.get("gate").runner_statistics().in_flight == 0)  # type: ignore[union-attr]
        assert model.cancelled.is_set() == model.entered.is_set()


async def test_a_request_waiting_in_a_batch_leaves_it_when_cancelled() -> None:
    settings = ModelSettings(name="echo", parallel_workers=0, max_batch_size=8)
    app = V2App([Identity(settings)], grpc_port=0, model_max_batch_time=600)
    async with serving(app) as clients:
        handle = app.registry.get("echo")
        message = raw_request("echo", x=np.ones((1, 2), dtype=np.float32))
        future = clients.stub.ModelInfer.future(message)
        await until(lambda: handle.batcher_statistics().queued_requests == 1)  # type: ignore[union-attr]
        future.cancel()
        await until(lambda: handle.batcher_statistics().queued_requests == 0)  # type: ignore[union-attr]
        stats = handle.batcher_statistics()
        assert stats is not None and stats.batches == 0
        await until(lambda: handled(app, "CANCELLED") == 1)


async def test_a_full_queue_is_resource_exhausted() -> None:
    model = gate(max_queue_size=1)
    app = V2App([model], grpc_port=0)
    async with serving(app) as clients:
        first = clients.stub.ModelInfer.future(request())
        with anyio.fail_after(60):
            await model.entered.wait()
        error = await call(rpc_error, clients.stub.ModelInfer, request())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queued" in error.details()
        model.release.set()
        response = await call(first.result)
        assert response.model_name == "gate"


async def test_the_inference_timeout_is_deadline_exceeded() -> None:
    model = gate(inference_timeout=0.2)
    async with serving(V2App([model], grpc_port=0)) as clients:
        error = await call(rpc_error, clients.stub.ModelInfer, request())
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer within 0.2 s" in error.details()
        assert model.cancelled.is_set()
