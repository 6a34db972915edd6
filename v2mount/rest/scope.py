"""Reading an ASGI scope the way Starlette's routing does."""

from __future__ import annotations

from starlette.types import Scope

__all__ = ["route_path"]


def route_path(scope: Scope) -> str:
    """The path below ``root_path``, as Starlette's routing computes it."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :][:1] in ("/", ""):
        return path[len(root_path) :]
    return path
