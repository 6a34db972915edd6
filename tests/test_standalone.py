"""The standalone server built from settings."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from v2mount.settings import Settings
from v2mount.standalone import create_app
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
