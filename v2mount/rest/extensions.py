"""Triton's model repository and statistics extensions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from v2mount.errors import BadRequest, RepositoryDisabled
from v2mount.rest.body import request_body
from v2mount.rest.errors import json_response, v2_endpoint

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["repository_routes", "statistics_routes"]

_SMALL_BODY = 64 * 1024


async def _json_object(request: Request) -> dict[str, Any]:
    """An optional small JSON object body (empty body → ``{}``)."""
    body = await request_body(request, _SMALL_BODY)
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in request body: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("the request body must be a JSON object")
    return document


def repository_routes(app: V2App) -> list[BaseRoute]:
    def require_enabled() -> None:
        if not app.settings.repository_api_enabled:
            raise RepositoryDisabled("the model repository extension is disabled")

    @v2_endpoint
    async def index(request: Request) -> Response:
        require_enabled()
        document = await _json_object(request)
        ready_only = document.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequest("'ready' must be a boolean")
        entries = app.repository_index()
        if ready_only:
            entries = [entry for entry in entries if entry["state"] == "READY"]
        return json_response(entries)

    @v2_endpoint
    async def load(request: Request) -> Response:
        require_enabled()
        await _json_object(request)
        await app.load_model(request.path_params["name"])
        return json_response({})

    @v2_endpoint
    async def unload(request: Request) -> Response:
        require_enabled()
        await _json_object(request)
        await app.unload_model(request.path_params["name"])
        return json_response({})

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
    ]


def statistics_routes(app: V2App) -> list[BaseRoute]:
    @v2_endpoint
    async def statistics(request: Request) -> Response:
        params = request.path_params
        stats = app.model_statistics(params.get("name"), params.get("version"))
        return json_response({"model_stats": stats})

    return [
        Route("/v2/models/stats", statistics, methods=["GET"]),
        Route("/v2/models/{name}/stats", statistics, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/stats", statistics, methods=["GET"]),
    ]
