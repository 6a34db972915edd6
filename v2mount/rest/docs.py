"""Swagger UI pages for the server and each model, served offline.

``GET /v2/docs`` and ``/v2/docs/openapi.json`` document the whole server;
``GET /v2/models/{name}[/versions/{version}]/docs`` (and ``.../docs/openapi.json``)
document one model with its declared tensors and an example request. Swagger UI's
JavaScript and CSS come from the ``swagger-ui-bundle`` package, served by the app
itself under ``/v2/docs/static/``: nothing is fetched from a CDN, and the online spec
validator is switched off. Every link and the spec's server URL carry the mount prefix
(``root_path``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from v2mount.rest.errors import json_response, v2_endpoint
from v2mount.rest.openapi import model_document, server_document

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["STATIC_FILES", "docs_routes", "swagger_page"]

#: The Swagger UI files a docs page loads, with their media types.
STATIC_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
STATIC_PREFIX = "/v2/docs/static"

_ASSETS = Path(str(swagger_ui_path))
_CACHE = {"Cache-Control": "public, max-age=86400"}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="{static}/swagger-ui.css">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="{static}/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js" charset="utf-8"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {spec_url},
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
}});
</script>
</body>
</html>
"""


def _js_string(value: str) -> str:
    """A JavaScript string literal that is also safe inside ``<script>``."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")


def swagger_page(title: str, spec_url: str, root_path: str = "") -> str:
    """The Swagger UI HTML page for the spec at ``spec_url``, assets under ``root_path``."""
    return _PAGE.format(
        title=html.escape(title),
        static=html.escape(root_path.rstrip("/") + STATIC_PREFIX),
        spec_url=_js_string(spec_url),
    )


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def docs_routes(app: V2App) -> list[BaseRoute]:
    """The docs routes, or none when ``settings.docs_enabled`` is false.

    The documents list the routes of the router that serves the request
    (``request.app``), so they always match what the app answers.
    """
    if not app.settings.docs_enabled:
        return []
    settings = app.settings
    registry = app.registry

    @v2_endpoint
    async def server_spec(request: Request) -> Response:
        document = server_document(
            request.app.routes,
            title=settings.server_name,
            version=settings.server_version,
            root_path=_root(request),
        )
        return json_response(document)

    @v2_endpoint
    async def server_page(request: Request) -> Response:
        root = _root(request)
        page = swagger_page(settings.server_name, root + "/v2/docs/openapi.json", root)
        return HTMLResponse(page)

    @v2_endpoint
    async def model_spec(request: Request) -> Response:
        params = request.path_params
        version = params.get("version")
        handle = registry.get(params["name"], version)
        versions = [h.version for h in registry.versions(handle.name) if h.version is not None]
        document = model_document(
            request.app.routes,
            handle.settings,
            versions=versions,
            versioned=version is not None,
            root_path=_root(request),
        )
        return json_response(document)

    @v2_endpoint
    async def model_page(request: Request) -> Response:
        params = request.path_params
        version = params.get("version")
        handle = registry.get(params["name"], version)
        root = _root(request)
        path = f"{root}/v2/models/{quote(handle.name, safe='')}"
        title = handle.name
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
            title += f" (version {version})"
        return HTMLResponse(swagger_page(title, path + "/docs/openapi.json", root))

    @v2_endpoint
    async def static(request: Request) -> Response:
        name = request.path_params["file"]
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            return json_response({"error": f"no such file: {name!r}"}, 404)
        return FileResponse(_ASSETS / name, media_type=media_type, headers=_CACHE)

    def route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
        return Route(path, endpoint, methods=["GET"], include_in_schema=False)

    model = "/v2/models/{name}"
    version = model + "/versions/{version}"
    return [
        route("/v2/docs", server_page),
        route("/v2/docs/openapi.json", server_spec),
        route(STATIC_PREFIX + "/{file}", static),
        route(model + "/docs", model_page),
        route(model + "/docs/openapi.json", model_spec),
        route(version + "/docs", model_page),
        route(version + "/docs/openapi.json", model_spec),
    ]
