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
