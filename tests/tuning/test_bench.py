"""``AppBench``: a real ``V2App`` per configuration, driven through ASGI or the registry.

Every model here runs in process (``parallel_workers`` 0) so the tests stay fast; the
pool path is covered by the command-line test in ``test_cli.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from v2mount import Model, Settings
from v2mount.tuning import Config, TuneError, synthetic_request
from v2mount.tuning._bench import AppBench, Through, _asgi_send
from v2mount.tuning._inputs import request_body
from v2mount.types import InferenceRequest


class Double(Model):
    name = "double"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, payload: InferenceRequest) -> Any:
        return {"y": payload["x"] * np.float32(2)}


class Broken(Double):
    name = "broken"

    def predict(self, payload: InferenceRequest) -> Any:
        raise ValueError("broken on purpose")


class Unloadable(Double):
    name = "unloadable"

    def load(self) -> None:
        raise RuntimeError("no weights here")


def bench(model: Model, through: Through = "asgi", rows: int = 1) -> AppBench:
    body, request = request_body(synthetic_request(model.settings, rows))
    return AppBench(model.settings, Settings(), body, request, through=through, warmup=0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("through", ["asgi", "registry"])
async def test_a_step_answers_every_request(through: Through) -> None:
    async with bench(Double(), through).serve(Config(0)) as target:
        before = target.handle.stats.success.count
        step = await target.measure(2, 0.1)
        assert step.errors == 0 and step.error is None
        assert step.requests > 0 and step.mean_batch is None
        assert target.handle.stats.success.count - before >= step.requests


@pytest.mark.anyio
async def test_the_configuration_reaches_the_served_model() -> None:
    async with bench(Double(), rows=2).serve(Config(0, 4, 0.001)) as target:
        settings = target.handle.settings
        assert (settings.parallel_workers, settings.max_batch_size) == (0, 4)
        assert settings.max_batch_time == 0.001
        step = await target.measure(4, 0.1)
        assert step.errors == 0
        assert step.mean_batch is not None and 2.0 <= step.mean_batch <= 4.0  # 2-row requests


@pytest.mark.anyio
@pytest.mark.parametrize("through", ["asgi", "registry"])
async def test_a_model_that_fails_every_request_stops_at_warm_up(through: Through) -> None:
    with pytest.raises(TuneError, match=r"answered the tuning request with an error: .*broken"):
        async with bench(Broken(), through).serve(Config(0)):
            pytest.fail("a model that always fails is not measured")


@pytest.mark.anyio
async def test_a_model_that_does_not_load_says_why() -> None:
    with pytest.raises(TuneError, match=r"did not start with in-process: .*no weights here"):
        async with bench(Unloadable()).serve(Config(0)):
            pytest.fail("an unloadable model is not measured")


@pytest.mark.anyio
async def test_http_errors_carry_status_and_message() -> None:
    async with bench(Double()).serve(Config(0)) as target:
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'
        send = _asgi_send(target.app, "/v2/models/double/infer", body)
        with pytest.raises(TuneError, match=r"HTTP 400: .*shape \[1\] does not match"):
            await send()
