"""``V2Middleware``: answer the OIP routes inside a host app, pass everything else on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2mount.model import Model
from v2mount.rest.app import V2App
from v2mount.settings import ModelSettings, Settings

__all__ = ["V2Middleware"]


class V2Middleware:
    """Pure ASGI middleware: ``host.add_middleware(V2Middleware, repository=..., prefix="")``.

    Requests under ``{prefix}/v2`` (and the metrics path) go to a ``V2App``; every
    other scope reaches the host untouched. The host's lifespan starts the models
    after the host's own start-up and stops them before its shutdown completes.
    """

    def __init__(
        self,
        app: ASGIApp,
        models: Sequence[Model | ModelSettings] = (),
        *,
        prefix: str = "",
        repository: str | Path | None = None,
        settings: Settings | None = None,
        v2app: V2App | None = None,
        **overrides: Any,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix {prefix!r} must start with '/' and not end with '/'")
        self.app = app
        self.prefix = prefix
        self.v2app = v2app or V2App(models, repository=repository, settings=settings, **overrides)
        metrics_path = self.v2app.settings.metrics_path
        self._exact = {prefix + "/v2"} | ({prefix + metrics_path} if metrics_path else set())
        self._under = prefix + "/v2/"

    def _owns(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._under)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        path: str = scope["path"]
        route_path = path[len(root_path) :] if path.startswith(root_path) else path
        if scope["type"] == "http" and self._owns(route_path):
            child = dict(scope)
            child["root_path"] = root_path + self.prefix
            await self.v2app(child, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.v2app.startup()
            elif message["type"] == "lifespan.shutdown.complete":
                await self.v2app.shutdown()
            await send(message)

        await self.app(scope, receive, send_wrapper)
