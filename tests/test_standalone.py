"""The standalone server built from settings."""

from __future__ import annotations

import gc
from typing import Any

import httpx
import pytest

from v2mount import V2App
from v2mount.settings import Settings
from v2mount.standalone import create_app, standalone_settings
from v2mount.testing import run_lifespan

pytestmark = pytest.mark.anyio


async def test_route_prefix_serves_everything_under_it() -> None:
    app: Any = create_app(route_prefix="/ml", model_parallel_workers=0)
    async with run_lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/ml/v2/health/ready")).status_code == 200
            assert (await client.get("/ml/v2/models/linear/versions/2/ready")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 404


def test_route_prefix_is_checked() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        Settings(route_prefix="ml/")


def test_the_standalone_server_freezes_the_collector_a_mounted_app_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert standalone_settings().gc_freeze is True  # it owns its process
    assert V2App(model_parallel_workers=0).settings.gc_freeze is None  # a host's process
    monkeypatch.setenv("V2MOUNT_GC_FREEZE", "false")
    assert standalone_settings().gc_freeze is False


async def test_gc_freeze_freezes_once_the_models_have_loaded() -> None:
    app = V2App(model_parallel_workers=0, gc_freeze=True)
    assert gc.get_freeze_count() == 0
    try:
        async with app.lifespan():
            assert gc.get_freeze_count() > 0
            assert all(handle.ready for handle in app.registry.handles())
    finally:
        gc.unfreeze()  # the test process is not the server's
