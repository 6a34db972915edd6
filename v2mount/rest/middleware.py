"""``V2Middleware``: answer the OIP routes inside a host app, pass everything else on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2mount.model import Model
from v2mount.rest.app import V2App
from v2mount.rest.scope import route_path
from v2mount.settings import ModelSettings, Settings

__all__ = ["V2Middleware"]

_GROUP = re.compile(r"\(\?P<\w+>")


def _paths_pattern(routes: Sequence[BaseRoute]) -> re.Pattern[str]:
    """One regex matching every path some route answers (any method).

    Built once from the routes' own regexes (named groups made anonymous so they can be
    joined): one match per request instead of one per route.
    """
    patterns = [
        _GROUP.sub("(?:", regex.pattern)
        for route in routes
        if (regex := getattr(route, "path_regex", None)) is not None
    ]
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


class V2Middleware:
    """Pure ASGI middleware: ``host.add_middleware(V2Middleware, repository=..., prefix="")``.

    An HTTP request whose path (below ``prefix``) is one the ``V2App`` has a route for —
    the OIP routes, its docs, its metrics path — goes to the ``V2App``, with the prefix
    added to ``root_path`` as a ``Mount`` would; every other scope reaches the host
    untouched, including the host's own routes under ``/v2``. Middleware added after
    this one (so outside it: auth, CORS, logging) applies to the OIP routes too.

    Give the arguments of ``V2App`` (``models``, ``repository``, ``settings``, setting
    overrides), or a ready ``v2app``. (``app`` is positional-only so that type checkers
    accept ``Middleware(V2Middleware, **options)`` and ``add_middleware``.)

    The host's lifespan, which Starlette and FastAPI pass through their middleware,
    starts the models once the host's own start-up is complete, and stops them
    (shielded from cancellation) when the host's shutdown completes or fails, or its
    lifespan ends any other way. Without a lifespan, models start on the first OIP
    request.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
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
        if v2app is not None and (models or repository or settings is not None or overrides):
            raise ValueError("give either v2app or the arguments to build one, not both")
        self.app = app
        self.prefix = prefix
        if v2app is None:
            v2app = V2App(models, repository=repository, settings=settings, **overrides)
        self.v2app = v2app
        self._paths = _paths_pattern(self.v2app.routes())

    def owns(self, scope: Scope) -> bool:
        """Whether this scope is a request for the ``V2App`` (any method)."""
        if scope["type"] != "http":
            return False
        path = route_path(scope)
        if not path.startswith(self.prefix):
            return False
        return self._paths.fullmatch(path[len(self.prefix) :]) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif self.owns(scope):
            root_path: str = scope.get("root_path", "")
            child = {
                **scope,
                "app_root_path": scope.get("app_root_path", root_path),
                "root_path": root_path + self.prefix,
            }
            await self.v2app(child, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def stop() -> None:
            nonlocal started
            if started:
                started = False
                await self.v2app.shutdown()

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                started = True
                await self.v2app.startup()
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await stop()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            with anyio.CancelScope(shield=True):
                await stop()
