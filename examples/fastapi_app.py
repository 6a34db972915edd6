"""A FastAPI service that mounts v2mount at ``/ml`` beside its own routes.

    python examples/models/iris/train.py       # once: the iris model's artefact
    uvicorn examples.fastapi_app:app           # from the repository root

Then ``GET /orders/7`` is the host's own route, ``GET /ml/v2/models/iris`` the model's
metadata, ``POST /ml/v2/models/iris/infer`` inference and ``/ml/v2/docs`` the Swagger UI.
``Mount`` does not pass the lifespan on to the mounted app, so the host's lifespan
composes ``ml.lifespan()``: models load before the first request and the worker
processes stop with the service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from v2mount import V2App

MODELS = Path(__file__).resolve().parent / "models"


def create_app(repository: str | Path = MODELS) -> FastAPI:
    """The service, serving the model repository at ``repository`` under ``/ml``."""
    ml = V2App(repository=repository)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with ml.lifespan():  # load every model now; stop the workers at shutdown
            yield

    app = FastAPI(title="Orders", lifespan=lifespan)

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, object]:
        return {"order": order_id, "status": "shipped"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.mount("/ml", ml)
    return app


app = create_app()
