"""A Starlette service where v2mount answers the OIP routes behind the host's own auth.

    python examples/models/iris/train.py       # once: the iris model's artefact
    EXAMPLE_API_TOKEN=s3cret uvicorn examples.starlette_app:app

``V2Middleware`` answers ``/v2/...`` (and ``/metrics``) and passes every other request
to the host. The host's ``BearerAuth`` middleware is listed first, so it runs first and
guards everything: ``POST /v2/models/iris/infer`` without ``Authorization: Bearer
s3cret`` gets 401. The health routes stay open so that a load balancer or Kubernetes can
probe them; ``create_app(open_health=False)`` closes them too. The host's lifespan
reaches the middleware, which loads the models at start-up and stops them at shutdown.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from v2mount import V2Middleware

MODELS = Path(__file__).resolve().parent / "models"
HEALTH = frozenset({"/v2/health/live", "/v2/health/ready"})


class BearerAuth:
    """Pure ASGI middleware: HTTP requests need ``Authorization: Bearer <token>``.

    Paths in ``open_paths`` need no token. Lifespan and other scopes pass untouched.
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = frozenset()):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                headers = {"www-authenticate": "Bearer"}
                response = JSONResponse({"error": "unauthorized"}, 401, headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def home(request: Request) -> Response:
    return PlainTextResponse("orders service")


def create_app(
    token: str | None = None, *, open_health: bool = True, repository: str | Path = MODELS
) -> Starlette:
    """The service; ``token`` defaults to ``$EXAMPLE_API_TOKEN``."""
    token = token or os.environ.get("EXAMPLE_API_TOKEN", "")
    if not token:
        raise RuntimeError("set EXAMPLE_API_TOKEN (or pass a token) to start this example")
    open_paths = frozenset({"/"}) | (HEALTH if open_health else frozenset())
    return Starlette(
        routes=[Route("/", home)],
        middleware=[
            Middleware(BearerAuth, token=token, open_paths=open_paths),
            Middleware(V2Middleware, repository=repository),
        ],
    )


app = create_app(os.environ.get("EXAMPLE_API_TOKEN") or "change-me")
