"""Model handles resolve server defaults and check declared settings at construction."""

from __future__ import annotations

from typing import Any

import pytest

from v2mount import InferenceRequest, Model, V2App
from v2mount.errors import SettingsError

pytestmark = pytest.mark.anyio


class Threads(Model):
    name = "threads"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"n": [self.settings.threads_per_worker or 0]}


async def test_server_thread_default_reaches_the_model(serve: Any) -> None:
    app = V2App(
        [Threads(), Threads(name="own", threads_per_worker=3)],
        model_parallel_workers=0,
        model_threads_per_worker=2,
    )
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}]}
    async with serve(app) as client:
        for name, expected in (("threads", 2), ("own", 3)):
            r = await client.post(f"/v2/models/{name}/infer", json=body)
            assert r.json()["outputs"][0]["data"] == [expected]


def test_declared_content_type_is_checked_at_construction() -> None:
    with pytest.raises(SettingsError, match="parquet"):
        V2App([Threads(parameters={"content_type": "parquet"})])


def test_effective_settings_fill_what_the_model_left_unset_and_copy() -> None:
    model = Threads(name="own", threads_per_worker=3)
    given = model.settings
    app = V2App([model], model_parallel_workers=0, model_max_queue_size=7)
    handle = app.registry.get("own")
    assert (handle.settings.threads_per_worker, handle.settings.max_queue_size) == (3, 7)
    assert handle.settings.parallel_workers == 0 and handle.settings.inference_timeout == 60
    # The settings object the model was built with is left as it was.
    assert given.max_queue_size is None and given.parallel_workers is None


class Echo(Model):
    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"]}


async def test_statistics_tell_queue_time_from_inference_time(serve: Any) -> None:
    """A request waiting for its batch to go counts that wait as queue time."""
    app = V2App([Echo(max_batch_size=4, max_batch_time=0.05)], model_parallel_workers=0)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
    async with serve(app) as client:
        assert (await client.post("/v2/models/echo/infer", json=body)).status_code == 200
        stats = (await client.get("/v2/models/echo/stats")).json()["model_stats"][0]
    times = stats["inference_stats"]
    assert times["queue"]["count"] == times["compute_infer"]["count"] == 1
    assert times["queue"]["ns"] > 0 and times["compute_infer"]["ns"] > 0
    assert times["queue"]["ns"] + times["compute_infer"]["ns"] == times["success"]["ns"]
