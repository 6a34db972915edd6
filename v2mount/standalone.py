"""The standalone server: ``uvicorn v2mount:app`` and ``python -m v2mount``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from v2mount.rest.app import V2App
from v2mount.settings import load_settings

__all__ = ["DEMO_REPOSITORY", "create_app"]

#: Served when no repository is configured: small numpy models shipped in the package.
DEMO_REPOSITORY = Path(__file__).parent / "demo"


def create_app(**overrides: Any) -> ASGIApp:
    """The server built from ``V2MOUNT_*`` settings (the demo models by default).

    A ``V2App``, or with ``route_prefix`` set a Starlette app mounting it there and
    running its lifespan.
    """
    settings = load_settings(**overrides)
    repository = settings.model_repository or DEMO_REPOSITORY
    app = V2App(repository=repository, settings=settings)
    if not settings.route_prefix:
        return app
    return Starlette(routes=[Mount(settings.route_prefix, app=app)], lifespan=app.lifespan)
