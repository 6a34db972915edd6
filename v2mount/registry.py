"""The models an app serves, keyed by (name, version), and the way of one inference.

``ModelHandle`` owns one model version: its state, its runner (in-process, a worker
pool, or its place in a shared pool), its optional batcher and its statistics.
``ModelRegistry`` finds handles and picks the default version of a name; its
``SharedPools`` hold the app's shared pools by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING, cast

import anyio

from v2mount.codecs.content import check_content_types, check_declared_content_types
from v2mount.errors import (
    InferenceTimeout,
    ModelNotFound,
    ModelNotReady,
    SettingsError,
    V2MountError,
    describe_exception,
    hide_paths,
)
from v2mount.metadata import select_outputs, validate_request
from v2mount.metrics.app import AppMetrics
from v2mount.model import Model
from v2mount.pipeline import Pipeline
from v2mount.request_ids import RequestIds
from v2mount.runner import InProcessRunner, MetricsSink, Runner, RunnerStatistics, StagedRunner
from v2mount.settings import ModelSettings, Settings
from v2mount.stages import has_stages
from v2mount.stats import InferenceStats, mark_started, started_at
from v2mount.types import InferenceRequest, InferenceResponse

if TYPE_CHECKING:
    from v2mount.batching import (
        AdaptiveBatcher,
        BatcherStatistics,
        PredictiveBatcher,
        PredictiveStatistics,
    )
    from v2mount.batching._tensors import BatchAnswer
    from v2mount.pool import PoolMember, SharedPool

__all__ = [
    "ModelHandle",
    "ModelRegistry",
    "ModelState",
    "SharedPools",
    "effective_settings",
    "version_key",
]

logger = logging.getLogger("v2mount.registry")


class ModelState(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


def version_key(version: str | None) -> tuple[int, int, str]:
    """Sort key: unversioned first, then numeric versions by value, then others."""
    if version is None:
        return (0, 0, "")
    if version.isdigit():
        return (1, int(version), version)
    return (2, 0, version)


def effective_settings(settings: ModelSettings, server: Settings) -> ModelSettings:
    """A copy of a model's settings with every field it left unset taken from the server.

    ``pool`` takes the server's ``default_pool`` only where the model leaves it out (an
    explicit ``null`` keeps a pool of its own) and runs worker processes of its own kind.
    """
    defaults: dict[str, object] = {
        "parallel_workers": server.default_workers(),
        "max_batch_size": server.model_max_batch_size,
        "max_batch_time": server.model_max_batch_time,
        "inference_timeout": server.model_inference_timeout,
        "max_queue_size": server.model_max_queue_size,
        "threads_per_worker": server.model_threads_per_worker,
        "max_requests_per_worker": server.model_max_requests_per_worker,
        "max_worker_memory_mb": server.model_max_worker_memory_mb,
    }
    unset = {name: value for name, value in defaults.items() if getattr(settings, name) is None}
    workers = unset.get("parallel_workers", settings.parallel_workers)
    backend = settings.pool_backend or server.pool_backend
    if "pool" not in settings.model_fields_set and workers and backend == "process":
        unset["pool"] = server.default_pool
    return settings.model_copy(update=unset)


class SharedPools:
    """An app's shared pools by name: models naming the same pool share its workers.

    A pool whose last model left is stopped; a model naming it later gets a new one.
    Called from the event loop.
    """

    def __init__(self, metrics_sink: MetricsSink) -> None:
        self._sink = metrics_sink
        self._pools: dict[str, SharedPool] = {}

    def member(
        self, name: str, model: Model, settings: ModelSettings, server: Settings
    ) -> PoolMember:
        """``model``'s place in pool ``name`` (``settings``: its effective settings)."""
        from v2mount.pool import PoolConfig, SharedPool

        config = PoolConfig.from_settings(settings, server)
        pool = self._pools.get(name)
        if pool is None or pool.closed:
            pool = self._pools[name] = SharedPool(name, config, metrics_sink=self._sink)
        return pool.member(model, config)

    def get(self, name: str) -> SharedPool | None:
        """The pool of that name, if any model named it (it may be stopped)."""
        return self._pools.get(name)


def _rows(request: InferenceRequest) -> int:
    first = request.inputs[0].shape
    return first[0] if first else 1


class ModelHandle:
    """One served model version. All methods run on the event loop thread.

    ``broken``: why the model's settings cannot be used; it then never loads and stays
    UNAVAILABLE with that reason, beside the models that serve.
    """

    def __init__(
        self,
        model: Model,
        server: Settings,
        metrics: AppMetrics,
        *,
        broken: str | None = None,
        pools: SharedPools | None = None,
    ) -> None:
        self.model = model
        #: The model's settings with the server's defaults filled in, made once; the model
        #: gets this copy too (runtimes size their thread pools from it).
        self.settings: ModelSettings = effective_settings(model.settings, server)
        model.settings = self.settings
        self.server = server
        self.metrics = metrics
        self.broken = broken
        if broken is None:
            check_declared_content_types(self.settings)
        self.state = ModelState.UNAVAILABLE
        self.reason = broken or ""
        self.stats = InferenceStats()
        self._ids = RequestIds()
        self._recorder: Callable[[bool, float], None] | None = None
        self._pools = pools if pools is not None else SharedPools(metrics.apply_custom)
        #: A runner made ahead of ``load`` (``prepare``).
        self._prepared: Runner | None = None
        self._runner: Runner | None = None
        self._batcher: AdaptiveBatcher | PredictiveBatcher | None = None
        self._pipeline: Pipeline[AdaptiveBatcher | PredictiveBatcher] | None = None
        self._in_flight = 0
        self._idle: anyio.Event | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str | None:
        return self.settings.version

    @property
    def in_flight(self) -> int:
        """Requests this handle is answering now (from ``infer``'s first line)."""
        return self._in_flight

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self._runner is not None and self._runner.ready

    def prepare(self) -> None:
        """Take the model's place in its shared pool now, if it names one.

        An app calls it for every model it is about to load, so that a shared pool starts
        with all of them, each worker loading them before it serves.
        """
        if self.broken is None and self._prepared is None and self.settings.pool is not None:
            try:
                self._prepared = self._make_runner()
            except SettingsError:
                pass  # ``load`` raises it again, with the model's reason

    def _make_runner(self) -> Runner:
        settings = self.settings
        assert settings.parallel_workers is not None and settings.max_queue_size is not None
        backend = settings.pool_backend or self.server.pool_backend
        if settings.pool is not None:
            if settings.parallel_workers == 0:
                raise SettingsError(
                    f"pool {settings.pool!r} runs worker processes, and parallel_workers "
                    "is 0 (in the server process): set one of them only"
                )
            if backend == "ray":
                raise SettingsError(
                    f"pool {settings.pool!r}: shared pools run local processes, "
                    'not pool_backend "ray"'
                )
            return self._pools.member(settings.pool, self.model, settings, self.server)
        if settings.parallel_workers == 0:
            return InProcessRunner(
                self.model,
                settings.max_queue_size,
                self.metrics.apply_custom,
                inline_budget=self.server.inline_predict_budget,
            )
        if backend == "ray":
            if has_stages(self.model):
                raise SettingsError("stages are not supported with pool_backend ray")
            from v2mount.ray_pool import RayPool

            assert settings.inference_timeout is not None
            return RayPool(
                self.model,
                settings.parallel_workers,
                max_queue_size=settings.max_queue_size,
                metrics_sink=self.metrics.apply_custom,
                actor_options=settings.ray_actor_options.ray_options(),
                address=self.server.ray_address,
                threads_per_worker=settings.threads_per_worker,
                hard_timeout=2 * settings.inference_timeout,
            )
        from v2mount.pool import PoolConfig, WorkerPool

        return WorkerPool(
            self.model,
            PoolConfig.from_settings(settings, self.server),
            metrics_sink=self.metrics.apply_custom,
        )

    async def load(self) -> None:
        """Start the runner; failure leaves the model UNAVAILABLE with the reason.

        Logs one line when the model is ready (workers, load time), or one error with
        the traceback when it is not (the client-facing reason stays sanitised).
        """
        if self.broken is not None:
            self.state, self.reason = ModelState.UNAVAILABLE, self.broken
            return
        self.state, self.reason = ModelState.LOADING, ""
        runner: Runner | None = None
        started = time.perf_counter()
        try:
            runner, self._prepared = self._prepared or self._make_runner(), None
            declared = await runner.start()
        except Exception as exc:
            if runner is not None:
                with anyio.CancelScope(shield=True):
                    await runner.stop()
            self.state = ModelState.UNAVAILABLE
            # One rule for every reason a client may read, in-process or from a pool.
            if isinstance(exc, V2MountError):
                # A pool's reason says "model 'x' failed to load: ..." already.
                message = exc.message.removeprefix(f"model {self.name!r} failed to load: ")
                self.reason = hide_paths(message)
            else:
                self.reason = describe_exception(exc)
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            logger.error(
                "model %s failed to load: %s",
                self.label,
                self.reason,
                # A worker's traceback was logged by its pool; in-process, here it is.
                exc_info=cause if not isinstance(cause, V2MountError) else None,
            )
            return
        assert runner is not None
        if declared is not None:
            # What the model's load declared in a worker: the metadata this handle serves.
            update = {"inputs": declared.inputs, "outputs": declared.outputs}
            self.settings = self.settings.model_copy(update=update)
        self._runner = runner
        settings = self.settings
        batch_size = settings.max_batch_size
        batch_time, queue_size = settings.max_batch_time, settings.max_queue_size
        assert batch_size is not None and batch_time is not None and queue_size is not None
        batching: Callable[[BatchAnswer | None], AdaptiveBatcher | PredictiveBatcher] | None = None
        if batch_size > 1:
            from v2mount.batching import batcher_for

            def make(answer: BatchAnswer | None) -> AdaptiveBatcher | PredictiveBatcher:
                return batcher_for(
                    runner,
                    settings.batching,
                    max_batch_size=batch_size,
                    max_batch_time=batch_time,
                    max_queue_size=queue_size,
                    on_batch=lambda rows, delays: self.metrics.observe_batch(
                        self.name, self.version, rows, delays
                    ),
                    answer=answer,
                )

            batching = make
        elif self.settings.batching is not None:
            logger.warning("model %s: batching is off (max_batch_size <= 1)", self.label)
        if has_stages(self.model):
            if batching is not None and settings.batching is None and batch_time > 0:
                logger.warning(
                    "model %s: max_batch_time is unused: a model with stages gathers the "
                    "requests that wait for a busy worker (up to max_batch_size) and runs "
                    "their whole chain in one trip; add a batching block to batch by time",
                    self.label,
                )
            self._pipeline = Pipeline(
                self.model,
                cast(StagedRunner, runner),  # not Ray's: _make_runner refused it
                batching,
                lambda stage, seconds: self.metrics.observe_stage(
                    self.name, self.version, stage, seconds
                ),
                group_size=batch_size,
                whole=settings.batching is None,
            )
            self._batcher = self._pipeline.batcher
        elif batching is not None:
            self._batcher = batching(None)
        self.state = ModelState.READY
        workers = runner.statistics().workers
        where = (
            f"{workers} worker process{'es' if workers != 1 else ''}" if workers else "in-process"
        )
        if settings.pool is not None:
            where += f" of pool {settings.pool!r}"
        logger.info(
            "model %s loaded: %s, in %.2f s", self.label, where, time.perf_counter() - started
        )

    async def unload(self) -> None:
        """Stop taking requests, let those in flight finish, then stop the runner."""
        with anyio.CancelScope(shield=True):
            self.state = ModelState.UNLOADING
            if self._in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
            runner, self._runner, self._batcher = self._runner, None, None
            self._pipeline = None
            if runner is not None:
                await runner.stop()
                logger.info("model %s unloaded", self.label)
            self.state, self.reason = ModelState.UNAVAILABLE, "unloaded"

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"

    def runner_statistics(self) -> RunnerStatistics | None:
        return self._runner.statistics() if self._runner is not None else None

    def batcher_statistics(self) -> BatcherStatistics | PredictiveStatistics | None:
        return self._batcher.statistics() if self._batcher is not None else None

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Validate, run (batched or not) under the deadline, and select outputs."""
        runner, executor = self._runner, self._pipeline or self._batcher or self._runner
        if self.state is not ModelState.READY or runner is None or executor is None:
            raise ModelNotReady(self.not_ready_message())
        if not runner.ready:  # a pool between workers: a replacement is starting
            raise ModelNotReady(self.not_ready_message(), retry_after=1)
        timeout = self.settings.inference_timeout
        assert timeout is not None
        if request.id is None:
            request.id = self._ids.next()  # as MLServer: every response carries an id
        start = time.perf_counter_ns()
        taken: int | None = start  # when the request left its queue (inline: at once)
        self._in_flight += 1
        ok = False
        try:
            validate_request(self.settings, request, any_input_name=type(self.model).any_input_name)
            check_content_types(request, self.settings)
            if executor is runner and isinstance(runner, InProcessRunner) and runner.inline:
                # No await inside an inline predict where a deadline could fire, but
                # a wait for a turn of the loop, which checks the timeout itself: skip
                # the cancel scope (and its timer) this request would pay for nothing.
                response = await runner.infer(request, timeout)
            else:
                # The runner or the batcher says when it takes the request up.
                mark_started(start)
                taken = None
                with anyio.fail_after(timeout):
                    response = await executor.infer(request)
            response = select_outputs(response, request)
            response.id = request.id
            ok = True
            return response
        except TimeoutError:
            error = InferenceTimeout(f"model {self.label} did not answer within {timeout:g} s")
            error.request_id = request.id
            raise error from None
        except V2MountError as exc:
            exc.request_id = request.id  # for the log line of the answer
            raise
        finally:
            end = time.perf_counter_ns()
            elapsed = end - start
            if taken is None:
                taken = started_at() or start
            self.stats.record(ok, elapsed, end - taken, _rows(request))
            recorder = self._recorder
            if recorder is None:
                recorder = self._recorder = self.metrics.inference_recorder(self.name, self.version)
            recorder(ok, elapsed / 1e9)
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    def not_ready_message(self) -> str:
        if self.state is ModelState.READY and self._runner is not None:
            reason = hide_paths(self._runner.reason or "no live worker")
            return f"model {self.label} is not ready: {reason}"
        reason = f": {self.reason}" if self.reason else ""
        return f"model {self.label} is not ready ({self.state.value}){reason}"


class ModelRegistry:
    """Handles by name and version; the unversioned name resolves to the default."""

    def __init__(self, pools: SharedPools | None = None) -> None:
        self._models: dict[str, dict[str | None, ModelHandle]] = {}
        #: The app's shared pools (``ModelHandle``s it makes take their places in them).
        self.pools = pools

    def add(self, handle: ModelHandle) -> None:
        versions = self._models.setdefault(handle.name, {})
        if handle.version in versions:
            raise SettingsError(f"model {handle.label} is defined twice")
        versions[handle.version] = handle

    def remove(self, handle: ModelHandle) -> None:
        versions = self._models.get(handle.name, {})
        versions.pop(handle.version, None)
        if not versions:
            self._models.pop(handle.name, None)

    def handles(self) -> Iterable[ModelHandle]:
        for versions in self._models.values():
            yield from versions.values()

    def versions(self, name: str) -> list[ModelHandle]:
        return sorted(self._models.get(name, {}).values(), key=lambda h: version_key(h.version))

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        """The handle for ``name`` (and ``version``); ``ModelNotFound`` if unknown."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        if version is not None:
            handle = versions.get(version)
            if handle is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r}")
            return handle
        if len(versions) == 1:  # the only version is the default
            for handle in versions.values():
                return handle
        marked = [h for h in versions.values() if h.settings.default_version]
        if marked:
            return marked[0]
        return max(versions.values(), key=lambda h: version_key(h.version))
