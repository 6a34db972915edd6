"""Exceptions → JSON ``{"error": ...}`` responses; the one place statuses are chosen."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from v2mount.codecs.response import json_dumps
from v2mount.errors import V2MountError
from v2mount.logs import log_error_answer

__all__ = ["error_response", "http_exception_handler", "json_response", "v2_endpoint"]

logger = logging.getLogger("v2mount")

Endpoint = Callable[[Request], Awaitable[Response]]


def json_response(
    document: object, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(json_dumps(document), status_code, headers, media_type="application/json")


def error_response(exc: V2MountError) -> Response:
    return json_response({"error": exc.message}, exc.status_code, exc.headers())


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) as JSON errors."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return json_response({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))


def v2_endpoint(endpoint: Endpoint) -> Endpoint:
    """Answer ``V2MountError`` with its status, anything else with a bare 500.

    A bug's traceback goes to the log, never to the client.
    """

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except V2MountError as exc:
            at_info = getattr(request.app.state, "log_client_errors", False)
            log_error_answer(exc, request.method, request.url.path, client_errors_at_info=at_info)
            return error_response(exc)
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, request.url.path)
            return json_response({"error": "internal server error"}, 500)

    return wrapper
