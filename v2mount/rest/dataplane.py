"""The core OIP routes: health, server and model metadata, readiness, inference."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from v2mount.codecs.request import decode_request, parse_header_length
from v2mount.codecs.response import HEADER_LENGTH, encode_response
from v2mount.metadata import model_metadata
from v2mount.rest.body import read_body
from v2mount.rest.errors import json_response, v2_endpoint

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["dataplane_routes"]

#: A readiness check that is false: OIP asks for a 4xx, Triton answers 400; a
#: Kubernetes probe fails on any status outside 200-399.
NOT_READY = 400

#: Bodies above this size are decoded and encoded in a worker thread, not on the loop.
THREAD_CODEC_BYTES = 256 * 1024


def dataplane_routes(app: V2App) -> list[BaseRoute]:
    registry = app.registry

    @v2_endpoint
    async def server_metadata(request: Request) -> Response:
        return json_response(
            {
                "name": app.settings.server_name,
                "version": app.settings.server_version,
                "extensions": app.extensions(),
            }
        )

    @v2_endpoint
    async def live(request: Request) -> Response:
        return json_response({"live": True})

    @v2_endpoint
    async def server_ready(request: Request) -> Response:
        not_ready = [h.label for h in registry.handles() if not h.ready]
        if not_ready:
            return json_response(
                {"ready": False, "error": f"models not ready: {', '.join(sorted(not_ready))}"},
                NOT_READY,
            )
        return json_response({"ready": True})

    @v2_endpoint
    async def model_ready(request: Request) -> Response:
        params = request.path_params
        handle = registry.get(params["name"], params.get("version"))
        if not handle.ready:
            return json_response(
                {"name": handle.name, "ready": False, "error": handle.not_ready_message()},
                NOT_READY,
            )
        return json_response({"name": handle.name, "ready": True})

    @v2_endpoint
    async def metadata(request: Request) -> Response:
        params = request.path_params
        handle = registry.get(params["name"], params.get("version"))
        versions = [h.version for h in registry.versions(handle.name) if h.version is not None]
        return json_response(model_metadata(handle.settings, versions))

    @v2_endpoint
    async def infer(request: Request) -> Response:
        params = request.path_params
        handle = registry.get(params["name"], params.get("version"))
        body = await read_body(request, app.settings.max_request_bytes)
        started = time.perf_counter_ns()
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        large = len(body) > THREAD_CODEC_BYTES
        if large:
            payload = await anyio.to_thread.run_sync(
                decode_request, body, header_length, limiter=app.codec_limiter
            )
        else:
            payload = decode_request(body, header_length)
        decoded = time.perf_counter_ns()
        handle.stats.compute_input.add(decoded - started)
        response = await handle.infer(payload)
        encoding = time.perf_counter_ns()
        if large or any(t.data.nbytes > THREAD_CODEC_BYTES for t in response.outputs):
            content, headers = await anyio.to_thread.run_sync(
                encode_response, response, payload, limiter=app.codec_limiter
            )
        else:
            content, headers = encode_response(response, payload)
        handle.stats.compute_output.add(time.perf_counter_ns() - encoding)
        return Response(content, headers=headers)

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route(model + "/ready", model_ready, methods=["GET"]),
        Route(version + "/ready", model_ready, methods=["GET"]),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(version + "/infer", infer, methods=["POST"]),
        Route(model, metadata, methods=["GET"]),
        Route(version, metadata, methods=["GET"]),
    ]
