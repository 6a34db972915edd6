"""``V2App``: the OIP server as an ASGI application to run alone or mount in a host."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from v2mount.errors import BadRequest, HeadersTooLarge, ModelNotFound, SettingsError
from v2mount.metrics.app import AppMetrics
from v2mount.model import Model
from v2mount.registry import ModelHandle, ModelRegistry, ModelState, SharedPools, version_key
from v2mount.repository import BrokenModel, ModelRepository, instantiate
from v2mount.rest.dataplane import dataplane_routes
from v2mount.rest.docs import docs_routes
from v2mount.rest.errors import error_response, http_exception_handler
from v2mount.rest.extensions import repository_routes, statistics_routes
from v2mount.rest.infer import InferEndpoint
from v2mount.rest.metrics import RestMetricsMiddleware, metrics_routes
from v2mount.settings import ModelSettings, Settings, load_settings

if TYPE_CHECKING:
    from v2mount.grpc import GrpcServer

__all__ = ["V2App"]

logger = logging.getLogger("v2mount")


class V2App:
    """An ASGI app serving models over the Open Inference Protocol.

    Give it models (``Model`` instances or ``ModelSettings``), a repository folder, or
    neither (then ``settings.model_repository``). Run it with uvicorn, or mount it:
    ``host.mount("/ml", V2App(...))``. Models start with the ASGI lifespan when one runs;
    a host whose ``Mount`` does not forward lifespan gets them started on the first
    request (concurrent first requests wait for one start), and can compose
    ``app.lifespan()`` into its own lifespan to start and stop them with the host.
    With ``grpc_port`` set, the gRPC service (``app.grpc``) starts and stops with them,
    on its own port.
    """

    def __init__(
        self,
        models: Sequence[Model | ModelSettings] = (),
        *,
        repository: str | Path | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings if settings is not None else load_settings(**overrides)
        root = Path(repository) if repository is not None else self.settings.model_repository
        self.repository = ModelRepository(root) if root is not None else None
        self.metrics = AppMetrics()
        self.registry = ModelRegistry(SharedPools(self.metrics.apply_custom))
        self.codec_limiter = anyio.CapacityLimiter(2)
        for item in models:
            self._add(item if isinstance(item, Model) else instantiate(item))
        if self.repository is not None:
            for entry in self.repository.load(self.repository.scan_all()):
                self._add(entry)
        self._started = False
        self._starting: anyio.Event | None = None
        self._stopping = False
        router = Starlette(
            routes=self.routes(),
            exception_handlers={HTTPException: http_exception_handler},
            lifespan=self.lifespan,
        )
        router.state.log_client_errors = self.settings.log_client_errors
        self._router = RestMetricsMiddleware(router, self.metrics, router.routes)
        self._infer = InferEndpoint(self)
        self.metrics.track_queues(self.registry.handles)
        self.grpc: GrpcServer | None = None
        if self.settings.grpc_port is not None:
            try:
                from v2mount.grpc import GrpcServer
            except ImportError as exc:
                raise SettingsError(
                    f"grpc_port is set but gRPC support is missing ({exc}): "
                    "pip install 'v2mount[grpc]'"
                ) from None
            self.grpc = GrpcServer(self)

    def _add(self, model: Model | BrokenModel) -> ModelHandle:
        if isinstance(model, BrokenModel):
            broken = model.placeholder()
            handle = ModelHandle(broken, self.settings, self.metrics, broken=model.reason)
        else:
            handle = ModelHandle(model, self.settings, self.metrics, pools=self.registry.pools)
        self.registry.add(handle)
        return handle

    def routes(self) -> list[BaseRoute]:
        """Every route this app answers, relative to its mount point."""
        routes = [*statistics_routes(self), *repository_routes(self), *dataplane_routes(self)]
        routes += [*docs_routes(self), *metrics_routes(self)]
        return routes

    def extensions(self) -> list[str]:
        served = ["binary_tensor_data", "statistics", "parameters"]
        if self.settings.repository_api_enabled:
            served.append("model_repository")
        return served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = 0
            for name, value in scope["headers"]:
                size += len(name) + len(value)
            if size > self.settings.max_header_bytes:
                error = HeadersTooLarge(
                    f"request headers of {size} bytes exceed the "
                    f"{self.settings.max_header_bytes}-byte limit"
                )
                await error_response(error)(scope, receive, send)
                return
            if not self._started and not self._stopping:
                await self.startup()
            inference = self._infer.match(scope)
            if inference is not None:  # the hot path skips Starlette's router
                await self._infer.serve(scope, receive, send, inference)
                return
        await self._router(scope, receive, send)

    # -- lifecycle -------------------------------------------------------------------

    async def startup(self) -> None:
        """Load every model (concurrently); returns when each is ready or has failed.

        Idempotent and safe to call from concurrent requests: one load, the others wait.
        A model that fails to load is UNAVAILABLE with its reason; the others serve.
        """
        if self._started:
            return
        self._stopping = False
        if self._starting is not None:
            await self._starting.wait()
            return
        self._starting = anyio.Event()
        try:
            if self.grpc is not None:  # first: a port it cannot bind fails before any load
                await self.grpc.start()
            handles = list(self.registry.handles())
            for handle in handles:
                handle.prepare()  # a shared pool starts with every model it will serve
            async with anyio.create_task_group() as tg:
                for handle in handles:
                    tg.start_soon(handle.load)
            if self.settings.gc_freeze:
                gc.freeze()  # see Settings.gc_freeze
            self._started = True
        finally:
            self._starting.set()
            self._starting = None

    async def shutdown(self) -> None:
        """Drain in-flight requests and stop every model's workers (shielded)."""
        with anyio.CancelScope(shield=True):
            self._stopping = True  # a late request must not start the models again
            if self.grpc is not None:  # its in-flight calls finish while models serve
                await self.grpc.stop()
            async with anyio.create_task_group() as tg:
                for handle in self.registry.handles():
                    tg.start_soon(handle.unload)
            self._started = False

    @asynccontextmanager
    async def lifespan(self, _: Any = None) -> AsyncIterator[None]:
        """Start models on entry, stop them on exit: compose it into a host's lifespan.

        It takes (and ignores) an app argument and yields no state, so it can also be
        given directly as a Starlette or FastAPI ``lifespan=``.
        """
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    # -- statistics and repository extensions (REST and gRPC) ----------------------------

    def model_statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Statistics entries of every model, every version of ``name``, or one version."""
        if name is None:
            handles = list(self.registry.handles())
        elif version is None:
            handles = self.registry.versions(name)
            if not handles:
                raise ModelNotFound(f"model {name!r} not found")
        else:
            handles = [self.registry.get(name, version)]
        return [h.stats.as_dict(h.name, h.version) for h in handles]

    def repository_index(self) -> list[dict[str, Any]]:
        entries: dict[tuple[str, str | None], dict[str, Any]] = {}
        if self.repository is not None:
            for found in self.repository.scan():
                entries[(found.name, found.version)] = {
                    "name": found.name,
                    **({"version": found.version} if found.version is not None else {}),
                    "state": ModelState.UNAVAILABLE.value,
                    "reason": "not loaded",
                }
        for handle in self.registry.handles():
            entry: dict[str, Any] = {"name": handle.name}
            if handle.version is not None:
                entry["version"] = handle.version
            state = handle.state
            if state is ModelState.READY and not handle.ready:
                state = ModelState.UNAVAILABLE
            entry["state"] = state.value
            entry["reason"] = "" if state is ModelState.READY else handle.reason
            entries[(handle.name, handle.version)] = entry
        return [entries[key] for key in sorted(entries, key=lambda k: (k[0], version_key(k[1])))]

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
            raise BadRequest(f"invalid model name {name!r}")

    async def load_model(self, name: str) -> None:
        """(Re)load every version of ``name``, re-reading its settings from the repository."""
        self._check_name(name)
        found = self.repository.find_all(name) if self.repository is not None else []
        old = self.registry.versions(name)
        if not found and not old:
            raise ModelNotFound(f"model {name!r} is not in the model repository")
        if found:
            assert self.repository is not None
            fresh = self.repository.load(found)
            for handle in old:
                await handle.unload()
                self.registry.remove(handle)
            handles = [self._add(model) for model in fresh]
        else:
            for handle in old:
                await handle.unload()
            handles = old
        for handle in handles:
            handle.prepare()
        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(handle.load)
        failed = [h for h in handles if not h.ready]
        if failed:
            raise BadRequest(
                "; ".join(f"failed to load model {h.label}: {h.reason}" for h in failed)
            )

    async def unload_model(self, name: str) -> None:
        """Unload every version of ``name`` after its in-flight requests finish."""
        self._check_name(name)
        handles = self.registry.versions(name)
        if not handles:
            raise ModelNotFound(f"model {name!r} not found")
        for handle in handles:
            await handle.unload()
