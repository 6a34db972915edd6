"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from v2mount import V2App


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def _serve(app: V2App) -> AsyncIterator[httpx.AsyncClient]:
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://v2mount.test") as client:
            yield client


@pytest.fixture
def serve() -> Callable[[V2App], AbstractAsyncContextManager[httpx.AsyncClient]]:
    """``async with serve(app) as client``: the app started, an httpx client bound to it."""
    return _serve
