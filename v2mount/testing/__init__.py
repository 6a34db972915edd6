"""Testing served models: clients with numpy in and out, and the pytest fixtures.

The pytest plugin (``v2_client``, ``v2_async_client``) is registered by the package's
``pytest11`` entry point; the pieces it is built from are here for use outside pytest
or in fixtures of a wider scope::

    with serve(MyModel, parallel_workers=2) as client:
        client.infer("my-model", {"x": np.ones((2, 4), np.float32)})

The names are imported on first use: pytest imports ``v2mount.testing.plugin`` (so this
package) in every run of every project installed beside v2mount, and that must neither
cost the clients' imports nor fail where ``httpx`` is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from v2mount.testing.client import AsyncV2Client, InferResult, V2Client, V2HTTPError
    from v2mount.testing.serving import (
        LifespanError,
        ModelsNotReady,
        Target,
        build_app,
        connect,
        connect_async,
        run_lifespan,
        serve,
        serve_async,
    )

__all__ = [
    "AsyncV2Client",
    "InferResult",
    "LifespanError",
    "ModelsNotReady",
    "Target",
    "V2Client",
    "V2HTTPError",
    "build_app",
    "connect",
    "connect_async",
    "run_lifespan",
    "serve",
    "serve_async",
]

_CLIENT = frozenset({"AsyncV2Client", "InferResult", "V2Client", "V2HTTPError"})


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'v2mount.testing' has no attribute {name!r}")
    module = "client" if name in _CLIENT else "serving"
    try:
        imported = importlib.import_module(f"v2mount.testing.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "httpx":
            raise
        raise ModuleNotFoundError(
            f"v2mount.testing.{name} needs httpx: pip install 'v2mount[testing]'", name="httpx"
        ) from exc
    value = getattr(imported, name)
    globals()[name] = value
    return value
