"""``POST /v2/models/{name}[/versions/{version}]/infer``: the lean path of every inference.

``V2App`` matches the path once, with one regex; that match gives the REST metrics'
label, the model's name and version, and leads straight here, past Starlette's router.
The body is read from ASGI ``receive`` as it comes (no ``Request``, no stream
generator), decoded straight to numpy, the answer encoded in one pass to bytes and sent
as one ``http.response.body`` message. What host middleware sees is plain ASGI.

The same endpoint is also an ordinary Starlette route (``InferEndpoint`` is an ASGI app
reading ``path_params``), so ``V2App.routes()`` and the OpenAPI document list it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import anyio.to_thread
from starlette.types import Receive, Scope, Send

from v2mount.codecs.request import decode_request, parse_header_length
from v2mount.codecs.response import encode_response, json_dumps
from v2mount.errors import V2MountError
from v2mount.logs import log_error_answer
from v2mount.rest.body import ClientDisconnect, read_body
from v2mount.rest.encoding import COMPRESS_MIN_BYTES, compress, response_coding
from v2mount.rest.metrics import RouteMetrics
from v2mount.rest.scope import route_path
from v2mount.types import InferenceResponse

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["MODEL_INFER", "VERSION_INFER", "InferEndpoint"]

MODEL_INFER = "/v2/models/{name}/infer"
VERSION_INFER = "/v2/models/{name}/versions/{version}/infer"

#: Bodies above this size are decoded, encoded and compressed in a worker thread.
THREAD_CODEC_BYTES = 256 * 1024

#: The status a request is counted under when its client left before the answer.
CLIENT_CLOSED = 499

# Starlette's ``{param}`` is ``[^/]+``: the same paths match here as in its router.
_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")
_VARY = (b"vary", b"Accept-Encoding")
_INTERNAL = json_dumps({"error": "internal server error"})

Headers = list[tuple[bytes, bytes]]

logger = logging.getLogger("v2mount")


def _has_large_output(response: InferenceResponse) -> bool:
    for tensor in response.outputs:
        if tensor.data.nbytes > THREAD_CODEC_BYTES:
            return True
    return False


class InferEndpoint:
    """Answers inference requests for one ``V2App``; see the module docstring."""

    def __init__(self, app: V2App) -> None:
        self._registry = app.registry
        self._settings = app.settings
        self._compress = app.settings.compress_responses
        self._limiter = app.codec_limiter
        self._metrics = app.metrics
        self._routes: dict[bool, RouteMetrics] = {}

    def match(self, scope: Scope) -> re.Match[str] | None:
        """The path's match when ``scope`` is an inference request, else ``None``."""
        if scope["method"] != "POST":
            return None
        return _PATH.fullmatch(route_path(scope))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a Starlette route's app (metrics are then the router's business)."""
        params = scope["path_params"]
        await self.answer(scope, receive, send, params["name"], params.get("version"))

    def serve(
        self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]
    ) -> Awaitable[int]:
        """Answer a request ``match`` found, counting and timing it in the REST metrics."""
        name, version = match.groups()
        versioned = version is not None
        route = self._routes.get(versioned)
        if route is None:
            template = VERSION_INFER if versioned else MODEL_INFER
            route = self._routes[versioned] = RouteMetrics(self._metrics, "POST", template)
        return self.answer(scope, receive, send, name, version, route)

    async def answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        name: str,
        version: str | None,
        route: RouteMetrics | None = None,
    ) -> int:
        """Send the answer; returns its status (``CLIENT_CLOSED`` if the client left).

        With ``route``, the request is counted and timed there (a client that left, or
        a ``send`` that failed, under ``CLIENT_CLOSED``).
        """
        if route is not None:
            route.in_progress.inc()
            start = time.perf_counter()
        answered = CLIENT_CLOSED
        try:
            try:
                status, headers, body = await self._infer(scope, receive, name, version)
            except ClientDisconnect:
                return CLIENT_CLOSED
            except V2MountError as exc:
                at_info = self._settings.log_client_errors
                log_error_answer(exc, "POST", scope["path"], client_errors_at_info=at_info)
                status, body = exc.status_code, json_dumps({"error": exc.message})
                headers = [_JSON, (b"content-length", b"%d" % len(body))]
                headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
            except Exception:
                logger.exception("unexpected error in POST %s", scope["path"])
                status, body = 500, _INTERNAL
                headers = [_JSON, (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            answered = status
            return status
        finally:
            if route is not None:
                route.in_progress.dec()
                route.answered(answered, time.perf_counter() - start)

    async def _infer(
        self, scope: Scope, receive: Receive, name: str, version: str | None
    ) -> tuple[int, Headers, bytes]:
        handle = self._registry.get(name, version)
        length = coding = header_length = accept = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"inference-header-content-length":
                header_length = value
            elif key == b"content-encoding":
                coding = value
            elif key == b"accept-encoding":
                accept = value
        limit = self._settings.max_request_bytes
        body = await read_body(receive, length, coding, limit, self._limiter)
        started = time.perf_counter_ns()
        json_length = parse_header_length(header_length, len(body))
        large = len(body) > THREAD_CODEC_BYTES
        if large:
            payload = await anyio.to_thread.run_sync(
                decode_request, body, json_length, limiter=self._limiter
            )
        else:
            payload = decode_request(body, json_length)
        handle.stats.compute_input.add(time.perf_counter_ns() - started)

        response = await handle.infer(payload)

        encoding = time.perf_counter_ns()
        if large or _has_large_output(response):
            content, binary_header = await anyio.to_thread.run_sync(
                encode_response, response, payload, limiter=self._limiter
            )
        else:
            content, binary_header = encode_response(response, payload)
        headers = [_JSON] if binary_header is None else [_BINARY]
        if binary_header is not None:
            headers.append((b"inference-header-content-length", b"%d" % binary_header))
        if accept is not None and len(content) >= COMPRESS_MIN_BYTES and self._compress:
            chosen = response_coding(accept)
            if chosen is not None:
                if len(content) > THREAD_CODEC_BYTES:
                    content = await anyio.to_thread.run_sync(
                        compress, content, chosen, limiter=self._limiter
                    )
                else:
                    content = compress(content, chosen)
                headers += [(b"content-encoding", chosen.encode()), _VARY]
        handle.stats.compute_output.add(time.perf_counter_ns() - encoding)
        headers.append((b"content-length", b"%d" % len(content)))
        return 200, headers, content
