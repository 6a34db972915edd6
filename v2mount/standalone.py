"""The standalone server: ``uvicorn v2mount:app`` and ``python -m v2mount``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from v2mount.rest.app import V2App
from v2mount.settings import load_settings

__all__ = ["DEMO_REPOSITORY", "create_app"]

#: Served when no repository is configured: small numpy models shipped in the package.
DEMO_REPOSITORY = Path(__file__).parent / "demo"


def create_app(**overrides: Any) -> V2App:
    """A ``V2App`` built from ``V2MOUNT_*`` settings (the demo models by default)."""
    settings = load_settings(**overrides)
    repository = settings.model_repository or DEMO_REPOSITORY
    return V2App(repository=repository, settings=settings)
