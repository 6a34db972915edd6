"""The core OIP routes: health, server and model metadata, readiness, inference."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from v2mount.metadata import model_metadata
from v2mount.rest.errors import json_response, v2_endpoint
from v2mount.rest.infer import MODEL_INFER, VERSION_INFER, InferEndpoint

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["dataplane_routes"]

#: A readiness check that is false: OIP asks for a 4xx, Triton answers 400; a
#: Kubernetes probe fails on any status outside 200-399.
NOT_READY = 400


def dataplane_routes(app: V2App) -> list[BaseRoute]:
    registry = app.registry
    infer = InferEndpoint(app)

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

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route(model + "/ready", model_ready, methods=["GET"]),
        Route(version + "/ready", model_ready, methods=["GET"]),
        Route(MODEL_INFER, infer, methods=["POST"]),
        Route(VERSION_INFER, infer, methods=["POST"]),
        Route(model, metadata, methods=["GET"]),
        Route(version, metadata, methods=["GET"]),
    ]
