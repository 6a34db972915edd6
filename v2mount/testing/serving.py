"""Standing an app up for a test: build it, run its lifespan, hand back a client.

``serve_async(target)`` accepts a ``Model`` class or instance (or a list of them), a
model repository folder, a ``V2App``, or any ASGI host app with v2mount inside; it runs
the app's ASGI lifespan (so pools start and stop with the block, exactly as under
uvicorn) and yields an ``AsyncV2Client`` talking to the app in memory. ``serve`` is the
same for synchronous code, through an anyio blocking portal. ``connect`` and
``connect_async`` give the same clients for a server that is already running.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import anyio
import httpx
import orjson
from anyio.from_thread import start_blocking_portal
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2mount.model import Model
from v2mount.rest.app import V2App
from v2mount.settings import ModelSettings, Settings, load_settings
from v2mount.testing.client import AsyncV2Client, V2Client

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "LifespanError",
    "ModelsNotReady",
    "Target",
    "build_app",
    "connect",
    "connect_async",
    "run_lifespan",
    "serve",
    "serve_async",
]

#: What ``serve`` can stand up: model classes or instances, a repository, or an ASGI app.
Target: TypeAlias = (
    type[Model] | Model | Sequence[type[Model] | Model] | str | os.PathLike[str] | ASGIApp
)

BASE_URL = "http://v2mount.test"

#: The fixtures run models in the test process unless told otherwise (cheap, debuggable).
TEST_DEFAULTS: dict[str, Any] = {"model_parallel_workers": 0}


class LifespanError(RuntimeError):
    """The app reported ``lifespan.startup.failed`` or ``lifespan.shutdown.failed``."""


class ModelsNotReady(RuntimeError):
    """Some model was not ready once the app had started; the message gives each reason."""


def _model_updates(
    settings: ModelSettings | Mapping[str, Any] | None, shortcuts: dict[str, Any]
) -> dict[str, Any]:
    if isinstance(settings, ModelSettings):
        updates = settings.model_dump(exclude_unset=True)
    else:
        updates = dict(settings or {})
    updates.update(shortcuts)
    return updates


def _model(item: type[Model] | Model, updates: dict[str, Any]) -> Model:
    if isinstance(item, type) and issubclass(item, Model):
        return item(updates)
    if isinstance(item, Model):
        if updates:
            current = item.settings.model_dump(exclude_unset=True)
            item.settings = ModelSettings.model_validate({**current, **updates})
        return item
    raise TypeError(f"expected a Model subclass or instance, got {item!r}")


def _server_settings(given: Settings | Mapping[str, Any] | None, extra: dict[str, Any]) -> Settings:
    if isinstance(given, Settings):
        return given.model_copy(update=extra) if extra else given
    return load_settings(**{**TEST_DEFAULTS, **dict(given or {}), **extra})


def build_app(
    target: Target,
    *,
    settings: ModelSettings | Mapping[str, Any] | None = None,
    parallel_workers: int | None = None,
    max_batch_size: int | None = None,
    max_batch_time: float | None = None,
    server_settings: Settings | Mapping[str, Any] | None = None,
) -> ASGIApp:
    """The ASGI app for ``target`` (see ``serve_async`` for what each argument does)."""
    shortcuts = {
        key: value
        for key, value in (
            ("parallel_workers", parallel_workers),
            ("max_batch_size", max_batch_size),
            ("max_batch_time", max_batch_time),
        )
        if value is not None
    }
    if isinstance(target, (str, os.PathLike)):
        if settings is not None:
            raise TypeError(
                "settings= sets a Model's settings; for a repository use server_settings= "
                "(or edit its model-settings.json)"
            )
        extra: dict[str, Any] = {f"model_{key}": value for key, value in shortcuts.items()}
        # Named in the settings too, so the repository's settings.json is read.
        extra["model_repository"] = Path(target)
        return V2App(repository=Path(target), settings=_server_settings(server_settings, extra))
    items: Sequence[type[Model] | Model] | None = None
    if isinstance(target, (type, Model)):
        items = [target]
    elif isinstance(target, (list, tuple)):
        items = target
    if items is not None:
        updates = _model_updates(settings, shortcuts)
        models = [_model(item, updates) for item in items]
        return V2App(models, settings=_server_settings(server_settings, {}))
    if settings is not None or shortcuts or server_settings is not None:
        raise TypeError(
            "settings, parallel_workers, max_batch_size, max_batch_time and server_settings "
            "apply to models or a repository, not to an app that is already built"
        )
    if isinstance(target, type) or not callable(target):
        raise TypeError(f"cannot serve {target!r}: expected a Model, a folder or an ASGI app")
    return target


@asynccontextmanager
async def run_lifespan(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Run ``app``'s ASGI lifespan around the block, as a server would.

    Yields the lifespan ``state`` (what a host's lifespan stored for its requests).
    The app's own start-up error is raised as itself; a reported failure as
    ``LifespanError``. Shutdown runs shielded from cancellation, so it always completes.
    """
    to_app, app_inbox = anyio.create_memory_object_stream[Message](2)
    app_outbox, from_app = anyio.create_memory_object_stream[Message](2)
    state: dict[str, Any] = {}
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    errors: list[Exception] = []
    finished = anyio.Event()

    async def run() -> None:
        try:
            async with app_inbox, app_outbox:
                await app(scope, app_inbox.receive, app_outbox.send)
        except Exception as exc:
            errors.append(exc)
        finally:
            finished.set()

    async def ask(event: str) -> None:
        """Send ``lifespan.<event>`` and wait for the app's answer."""
        try:
            await to_app.send({"type": f"lifespan.{event}"})
            message = await from_app.receive()
        except (anyio.BrokenResourceError, anyio.EndOfStream):
            message = {"type": "(the app returned)"}
        if message["type"] == f"lifespan.{event}.complete":
            return
        await finished.wait()
        if errors:
            raise errors[0]
        raise LifespanError(f"{event} failed: {message.get('message', message['type'])}")

    try:
        async with anyio.create_task_group() as tg, to_app, from_app:
            tg.start_soon(run)
            await ask("startup")
            try:
                yield state
            finally:
                with anyio.CancelScope(shield=True):
                    await ask("shutdown")
                    await finished.wait()
            if errors:
                raise errors[0]
    except BaseExceptionGroup as group:
        # The task group wraps whatever crosses it (trio's strict groups wrap even the
        # block's own error); hand back the one error there is, as itself.
        sole = _sole(group)
        if sole is None:
            raise
        raise sole from sole.__cause__


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


def _with_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """Give each request a copy of the lifespan state, as uvicorn does."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return wrapped


async def _check_ready(client: AsyncV2Client) -> None:
    response = await client.get("/v2/health/ready")
    if response.status_code == 200:
        return
    index = await client.post("/v2/repository/index", json={})
    if index.status_code == 200:
        problems = [
            f"{entry['name']}{':' + entry['version'] if 'version' in entry else ''} "
            f"{entry['state']}: {entry['reason']}"
            for entry in orjson.loads(index.content)
            if entry["state"] != "READY"
        ]
        detail = "; ".join(problems)
    else:
        detail = response.text
    raise ModelsNotReady(f"models not ready at {client.prefix or '/'}: {detail}")


@asynccontextmanager
async def serve_async(
    target: Target,
    *,
    prefix: str = "",
    wait_ready: bool = True,
    settings: ModelSettings | Mapping[str, Any] | None = None,
    parallel_workers: int | None = None,
    max_batch_size: int | None = None,
    max_batch_time: float | None = None,
    server_settings: Settings | Mapping[str, Any] | None = None,
) -> AsyncIterator[AsyncV2Client]:
    """Start ``target`` for the block and yield a client bound to it in memory.

    - a ``Model`` class is built with ``settings`` (``ModelSettings`` fields); a
      ``Model`` instance has ``settings`` applied to its ``settings``; a list serves
      several. ``parallel_workers``, ``max_batch_size`` and ``max_batch_time`` set the
      model's fields (for a repository: server defaults, which a ``model-settings.json``
      that sets the field overrides). Models run in-process unless ``parallel_workers``
      (or ``server_settings``) say otherwise.
    - a folder is a model repository; ``server_settings`` are ``Settings`` fields.
    - a ``V2App`` or a host ASGI app is served as given; ``prefix`` is where v2mount is
      mounted in it (``"/ml"``), and the client's OIP paths start there.

    With ``wait_ready`` the block starts only once ``/v2/health/ready`` answers 200 and
    raises ``ModelsNotReady`` with each model's reason otherwise. On exit (normal, error
    or cancellation) the app's lifespan shutdown runs: workers and shared memory are
    released before the block is left.
    """
    app = build_app(
        target,
        settings=settings,
        parallel_workers=parallel_workers,
        max_batch_size=max_batch_size,
        max_batch_time=max_batch_time,
        server_settings=server_settings,
    )
    async with run_lifespan(app) as state:
        transport = httpx.ASGITransport(app=_with_state(app, state))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            client = AsyncV2Client(http, prefix)
            if wait_ready:
                await _check_ready(client)
            yield client


@asynccontextmanager
async def connect_async(url: str, *, http_timeout: float = 30.0) -> AsyncIterator[AsyncV2Client]:
    """A client for a running server: ``connect_async("http://127.0.0.1:8000/ml")``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s)://host:port[/prefix] URL, got {url!r}")
    base = f"{parts.scheme}://{parts.netloc}"
    async with httpx.AsyncClient(base_url=base, timeout=http_timeout) as http:
        yield AsyncV2Client(http, parts.path.rstrip("/"))


@contextmanager
def serve(target: Target, *, backend: str = "asyncio", **options: Any) -> Iterator[V2Client]:
    """``serve_async`` for synchronous code: the app runs on ``backend`` in a portal thread.

    ``options`` are those of ``serve_async``. The portal, the app and its workers are
    all stopped when the block exits, also when it exits with an exception.
    """
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(serve_async(target, **options)) as client,
    ):
        yield V2Client(portal, client)


@contextmanager
def connect(
    url: str, *, backend: str = "asyncio", http_timeout: float = 30.0
) -> Iterator[V2Client]:
    """``connect_async`` for synchronous code."""
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(connect_async(url, http_timeout=http_timeout)) as client,
    ):
        yield V2Client(portal, client)
