"""Serving one configuration of a model with a real ``V2App``, in this process.

The load reaches the app one of two ways (``through``):

- ``"asgi"`` (default): the app is called as an ASGI application with a prebuilt request
  body, so routing, JSON decoding and encoding, the metrics middleware, validation, the
  batcher and the pool are all measured. Only the socket and the HTTP parser (uvicorn's
  part) are left out: a real HTTP client in the same process would cost more CPU than
  the server it measures, and on a small machine it would compete with the workers.
- ``"registry"``: ``ModelHandle.infer`` is awaited directly with a decoded request:
  validation, batcher and pool only, the part the three tuned settings change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio

from v2mount.errors import V2MountError
from v2mount.registry import ModelHandle
from v2mount.repository import instantiate
from v2mount.rest.app import V2App
from v2mount.settings import BatchingSettings, ModelSettings, Settings
from v2mount.tuning._inputs import TuneError
from v2mount.tuning._load import Send, run_step
from v2mount.tuning._results import Config, Step
from v2mount.types import InferenceRequest

__all__ = ["AppBench", "AppTarget", "Through"]

Through = Literal["asgi", "registry"]


class AppTarget:
    """A started app serving one configuration; ``measure`` runs one load step."""

    def __init__(
        self, app: V2App, handle: ModelHandle, send: Send, rows: int, warmup: float
    ) -> None:
        self.app = app
        self.handle = handle
        self._send = send
        self._rows = rows
        self._warmup = warmup

    async def warm_up(self) -> None:
        """A short step whose figures are dropped: first calls pay imports and caches."""
        step = await run_step(self._send, 2, self._warmup)
        if step.requests == 0 and step.errors:
            raise TuneError(
                f"model {self.handle.label} answered the tuning request with an error: "
                f"{step.error} (give a request the model accepts with --request FILE)"
            )

    def _batch_counts(self) -> tuple[int, int]:
        stats = self.handle.batcher_statistics()
        return (0, 0) if stats is None else (stats.batches, stats.batched_requests)

    async def measure(self, concurrency: int, duration: float) -> Step:
        batches, batched = self._batch_counts()
        step = await run_step(self._send, concurrency, duration)
        after_batches, after_batched = self._batch_counts()
        if after_batches > batches:
            mean = (after_batched - batched) / (after_batches - batches) * self._rows
            step = dataclasses.replace(step, mean_batch=mean)
        return step


def _asgi_send(app: V2App, path: str, body: bytes) -> Send:
    headers = [
        (b"host", b"tune.local"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def send() -> None:
        status = 0
        chunks: list[bytes] = []
        sent = False
        answered = anyio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def reply(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        await app(dict(scope), receive, reply)
        if status != 200:
            text = b"".join(chunks).decode("utf-8", "replace")
            raise TuneError(f"HTTP {status}: {text[:300]}")

    return send


def _registry_send(handle: ModelHandle, request: InferenceRequest) -> Send:
    async def send() -> None:
        # A fresh request object per call (the tensors are shared: nothing writes them).
        await handle.infer(
            InferenceRequest(
                list(request.inputs),
                request.id,
                dict(request.parameters),
                None if request.outputs is None else list(request.outputs),
            )
        )

    return send


class AppBench:
    """Serves ``settings`` (one model version) under each configuration asked for."""

    def __init__(
        self,
        settings: ModelSettings,
        server: Settings,
        body: bytes,
        request: InferenceRequest,
        through: Through = "asgi",
        warmup: float = 0.5,
    ) -> None:
        self.settings = settings
        self.server = server.model_copy(update={"model_repository": None})
        self.body = body
        self.request = request
        self.through = through
        self.warmup = warmup
        first = request.inputs[0].shape
        self.rows = first[0] if first else 1

    @asynccontextmanager
    async def serve(self, config: Config) -> AsyncIterator[AppTarget]:
        """Start an app with the model under ``config``; stop it (and its pool) on exit."""
        block = config.batching_block()
        update = {
            **config.settings(),
            # The model's own block, if any, is replaced: it would time the fixed window too.
            "batching": None if block is None else BatchingSettings.model_validate(block),
        }
        settings = self.settings.model_copy(update=update)
        try:
            app = V2App(models=[instantiate(settings)], settings=self.server)
        except V2MountError as exc:
            raise TuneError(exc.message) from None
        async with app.lifespan():
            handle = app.registry.get(settings.name, settings.version)
            if not handle.ready:
                raise TuneError(
                    f"model {handle.label} did not start with {config.label}: "
                    f"{handle.reason or handle.not_ready_message()}"
                )
            if self.through == "registry":
                send = _registry_send(handle, self.request)
            else:
                path = f"/v2/models/{settings.name}"
                if settings.version is not None:
                    path += f"/versions/{settings.version}"
                send = _asgi_send(app, path + "/infer", self.body)
            target = AppTarget(app, handle, send, self.rows, self.warmup)
            await target.warm_up()
            yield target
