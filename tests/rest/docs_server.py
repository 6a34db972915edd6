"""The app the headless-browser docs test serves with uvicorn (``--factory docs_server:create``).

The same models twice: at the root, and mounted under ``/ml`` in a Starlette host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from v2mount import InferenceRequest, Model, V2App


class Linear(Model):
    name = "lin"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1]}]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"].sum(axis=1)}


def create() -> Starlette:
    root = V2App([Linear()], model_parallel_workers=0)
    mounted = V2App([Linear()], model_parallel_workers=0)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with root.lifespan(), mounted.lifespan():
            yield

    return Starlette(routes=[Mount("/ml", mounted), Mount("", root)], lifespan=lifespan)
