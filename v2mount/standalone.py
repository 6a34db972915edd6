"""The standalone server: ``uvicorn v2mount:app`` and ``python -m v2mount``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from v2mount.errors import SettingsError
from v2mount.logs import configure_logging
from v2mount.rest.app import V2App
from v2mount.settings import Settings, load_settings

__all__ = ["DEMO_REPOSITORY", "build_app", "create_app", "standalone_app", "standalone_settings"]

#: Served when no repository is configured: small numpy models shipped in the package.
DEMO_REPOSITORY = Path(__file__).parent / "demo"


def build_app(settings: Settings | None = None, **overrides: Any) -> tuple[ASGIApp, V2App]:
    """``create_app``'s app (from ``settings``, else loaded), and the ``V2App`` inside it."""
    settings = settings if settings is not None else load_settings(**overrides)
    repository = settings.model_repository or DEMO_REPOSITORY
    app = V2App(repository=repository, settings=settings)
    handles = list(app.registry.handles())
    if handles and all(handle.broken is not None for handle in handles):
        raise SettingsError(
            f"nothing to serve: no model in {repository} has usable settings "
            f"({len(handles)} broken, each reason logged above)"
        )
    if not settings.route_prefix:
        return app, app
    mounted = Starlette(routes=[Mount(settings.route_prefix, app=app)], lifespan=app.lifespan)
    return mounted, app


def create_app(**overrides: Any) -> ASGIApp:
    """The server built from ``V2MOUNT_*`` settings (the demo models by default).

    A ``V2App``, or with ``route_prefix`` set a Starlette app mounting it there and
    running its lifespan. ``SettingsError`` when nothing at all can be served: bad
    server settings, or a repository whose every model has unusable settings (each
    one's reason is logged first).
    """
    return build_app(**overrides)[0]


def standalone_settings(**overrides: Any) -> Settings:
    """``load_settings``, with ``gc_freeze`` on unless set: this server owns its process."""
    settings = load_settings(**overrides)
    if settings.gc_freeze is None:
        settings = settings.model_copy(update={"gc_freeze": True})
    return settings


def standalone_app(**overrides: Any) -> ASGIApp:
    """``create_app`` with v2mount's logging set up: ``uvicorn v2mount:app``.

    When nothing can be served it prints one line to stderr and exits with status 1
    (uvicorn would otherwise print the traceback of the import).
    """
    configure_logging("info")  # until the settings say otherwise
    try:
        app, v2app = build_app(standalone_settings(**overrides))
    except SettingsError as exc:
        print(f"v2mount: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    configure_logging(v2app.settings.log_level)
    return app
