"""Where ``predict`` runs: the ``Runner`` contract and the in-process runner.

A runner owns one loaded model version. ``WorkerPool`` (``v2mount.pool``) is the runner
for ``parallel_workers > 0``; ``InProcessRunner`` serves ``parallel_workers == 0``: an
``async`` predict is awaited on the event loop, a plain one runs in a worker thread
(through a per-model limiter, so the loop never blocks and Starlette's default thread
pool is not drained).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.to_thread

from v2mount.errors import ModelError, ModelNotReady, Overloaded, V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model, call_load, call_predict, call_predict_sync
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["InProcessRunner", "MetricsSink", "Runner", "RunnerStatistics"]

#: Receives the custom-metric updates a model recorded (applied by the app's metrics).
MetricsSink = Callable[[list[MetricUpdate]], None]


@dataclass(frozen=True, slots=True)
class RunnerStatistics:
    """A snapshot of a runner's load, read by metrics and the statistics extension."""

    workers: int
    live_workers: int
    queued: int
    in_flight: int
    max_queue_size: int


class Runner(Protocol):
    """What the registry needs from whatever executes a model version.

    ``start`` loads the model (raising ``ModelNotReady`` with the reason if it cannot);
    ``infer`` answers one request or raises a ``V2MountError`` (``Overloaded`` when the
    queue is full); cancelling ``infer`` leaves no work behind that anyone waits for;
    ``stop`` releases every thread, process and shared-memory segment and is idempotent.
    """

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...

    async def stop(self) -> None: ...

    def statistics(self) -> RunnerStatistics: ...


class InProcessRunner:
    """Runs the model in this process (``parallel_workers == 0``)."""

    def __init__(self, model: Model, max_queue_size: int, metrics_sink: MetricsSink) -> None:
        self._model = model
        self._max_queue_size = max_queue_size
        self._sink = metrics_sink
        self._limiter = anyio.CapacityLimiter(1)
        self._async = inspect.iscoroutinefunction(model.predict)
        self._pending = 0
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        try:
            await call_load(self._model)
        except Exception as exc:
            raise ModelNotReady(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._sink(self._model.metrics.drain())
        self._ready = True

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if not self._ready:
            raise ModelNotReady(f"model {self._model.settings.name!r} is not loaded")
        if self._pending >= self._max_queue_size:
            raise Overloaded(
                f"model {self._model.settings.name!r} has {self._pending} requests queued"
            )
        self._pending += 1
        try:
            if self._async:
                return await call_predict(self._model, request)
            return await anyio.to_thread.run_sync(
                call_predict_sync, self._model, request, limiter=self._limiter
            )
        except V2MountError:
            raise
        except Exception as exc:
            raise ModelError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._pending -= 1
            self._sink(self._model.metrics.drain())

    async def stop(self) -> None:
        self._ready = False

    def statistics(self) -> RunnerStatistics:
        return RunnerStatistics(
            workers=0,
            live_workers=0,
            queued=max(0, self._pending - self._limiter.borrowed_tokens),
            in_flight=self._pending,
            max_queue_size=self._max_queue_size,
        )
