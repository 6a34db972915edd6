"""The HTTP side: ``V2App`` and ``V2Middleware``."""

from __future__ import annotations

from v2mount.rest.app import V2App
from v2mount.rest.middleware import V2Middleware

__all__ = ["V2App", "V2Middleware"]
