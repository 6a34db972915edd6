"""The v2mount pytest plugin (entry point ``pytest11``): ``v2_client`` and ``v2_async_client``.

Both fixtures are factories. Each call stands a target up (see
``v2mount.testing.serve_async``) and returns a client; everything a call started —
event loop thread, app, worker processes, shared memory — is stopped when the test
ends, whether it passed, failed or errored::

    def test_my_model(v2_client):
        client = v2_client(MyModel, parallel_workers=0)
        result = client.infer("my-model", {"x": np.ones((2, 4), np.float32)})
        assert result.outputs["y"].shape == (2, 1)

    @pytest.mark.anyio
    async def test_my_model_async(v2_async_client):
        client = await v2_async_client(MyModel, max_batch_size=8, max_batch_time=0.01)
        result = await client.infer("my-model", {"x": np.ones((2, 4), np.float32)})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    # Imported inside the fixtures instead: pytest loads this plugin in every run of
    # every project installed beside v2mount, which must not pay for (or need) these.
    from anyio.from_thread import BlockingPortal

    from v2mount.testing.client import AsyncV2Client, V2Client
    from v2mount.testing.serving import Target

__all__ = ["v2_async_client", "v2_client"]

SyncFactory = Callable[..., "V2Client"]
AsyncFactory = Callable[..., Awaitable["AsyncV2Client"]]


@pytest.fixture
def v2_client() -> Iterator[SyncFactory]:
    """``v2_client(target, *, backend="asyncio", **options) -> V2Client``.

    ``target`` and ``options`` are those of ``v2mount.testing.serve_async``: a Model
    class or instance (or a list), a repository folder, a ``V2App`` or a host app;
    ``settings``, ``parallel_workers``, ``max_batch_size``, ``max_batch_time``,
    ``server_settings``, ``prefix``, ``wait_ready``. Apps run on ``backend``
    ("asyncio" or "trio") in one portal thread per backend for the test.
    """
    from anyio.from_thread import start_blocking_portal

    from v2mount.testing.client import V2Client
    from v2mount.testing.serving import serve_async

    with ExitStack() as stack:
        portals: dict[str, BlockingPortal] = {}

        def factory(target: Target, *, backend: str = "asyncio", **options: Any) -> V2Client:
            if backend not in portals:
                portals[backend] = stack.enter_context(start_blocking_portal(backend))
            portal = portals[backend]
            client = stack.enter_context(
                portal.wrap_async_context_manager(serve_async(target, **options))
            )
            return V2Client(portal, client)

        yield factory


async def _serve_until(
    stop: anyio.Event,
    target: Target,
    options: dict[str, Any],
    *,
    task_status: TaskStatus[AsyncV2Client],
) -> None:
    from v2mount.testing.serving import serve_async

    async with serve_async(target, **options) as client:
        task_status.started(client)
        await stop.wait()


@pytest.fixture
async def v2_async_client() -> AsyncIterator[AsyncFactory]:
    """``await v2_async_client(target, **options) -> AsyncV2Client`` for async tests.

    Same options as ``v2_client`` (the backend is the test's own). Each app runs in a
    task of the fixture, so the test may call the factory inside its own cancel scopes.
    """
    stops: list[anyio.Event] = []
    async with anyio.create_task_group() as tg:

        async def factory(target: Target, **options: Any) -> AsyncV2Client:
            stop = anyio.Event()
            stops.append(stop)
            client: AsyncV2Client = await tg.start(_serve_until, stop, target, options)
            return client

        try:
            yield factory
        finally:
            for stop in reversed(stops):
                stop.set()
