"""Where ``predict`` runs: the ``Runner`` contract and the in-process runner.

A runner owns one loaded model version. ``WorkerPool`` (``v2mount.pool``) is the runner
for ``parallel_workers > 0``; ``InProcessRunner`` serves ``parallel_workers == 0``: an
``async`` predict is awaited on the event loop, a plain one runs in a worker thread
(through a per-model limiter, so the loop does not block and Starlette's default thread
pool is not drained) — unless it has proved faster than the thread hop itself, see
``_InlinePolicy``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from v2mount.errors import (
    ModelError,
    ModelNotReady,
    Overloaded,
    V2MountError,
    describe_exception,
)
from v2mount.loop_turns import LoopTurns
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model, call_load, call_predict, call_predict_sync
from v2mount.settings import TensorSpec
from v2mount.stages import (
    Answered,
    Gathered,
    Item,
    Staged,
    Timings,
    run_pipeline,
    run_predict_postprocess,
    run_preprocess_each,
)
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = [
    "Declared",
    "InProcessRunner",
    "MetricsSink",
    "Runner",
    "RunnerStatistics",
    "StagedRunner",
    "apply_metrics",
]

logger = logging.getLogger("v2mount.runner")
T = TypeVar("T")

#: Receives the custom-metric updates a model recorded (applied by the app's metrics).
MetricsSink = Callable[[list[MetricUpdate]], None]


def apply_metrics(
    sink: MetricsSink, updates: list[MetricUpdate], model_name: str, log: logging.Logger
) -> None:
    """Hand updates relayed from a worker to the sink; a sink that raises is logged, so a
    pool's own thread never dies of it."""
    if updates:
        try:
            sink(updates)
        except Exception:
            log.exception("model %r: the metrics sink raised", model_name)


@dataclass(frozen=True, slots=True)
class RunnerStatistics:
    """A snapshot of a runner's load, read by metrics and the statistics extension."""

    workers: int
    live_workers: int
    queued: int
    in_flight: int
    max_queue_size: int


class Declared(NamedTuple):
    """The inputs and outputs a model's ``load`` declared where the runner loaded it."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_wire(cls, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> Declared:
        """From the plain data a worker process or actor sent."""
        return cls(
            [TensorSpec.model_validate(spec) for spec in inputs],
            [TensorSpec.model_validate(spec) for spec in outputs],
        )


class Runner(Protocol):
    """What the registry needs from whatever executes a model version.

    ``start`` loads the model (raising ``ModelNotReady`` with the reason if it cannot)
    and returns what its ``load`` declared when that happened out of the caller's sight
    (in a worker process), for the caller to serve as metadata;
    ``infer`` answers one request or raises a ``V2MountError`` (``Overloaded`` when the
    queue is full); cancelling ``infer`` leaves no work behind that anyone waits for;
    ``stop`` releases every thread, process and shared-memory segment and is idempotent.
    """

    @property
    def ready(self) -> bool: ...

    @property
    def reason(self) -> str | None:
        """Why the runner is not ready (``None`` when it is)."""
        ...

    async def start(self) -> Declared | None: ...

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...

    async def stop(self) -> None: ...

    def statistics(self) -> RunnerStatistics: ...


class StagedRunner(Runner, Protocol):
    """A runner that also runs a model's stages (``v2mount.stages``), several requests a call.

    ``infer`` runs ``predict`` alone (on a batch of preprocessed requests, for a model
    without ``postprocess``). ``run_gathered`` runs the stages of the requests that
    ``take()`` returns — called on the event loop when the call starts, or again with
    the same result if it must start over: their ``preprocess``, or their whole chain
    (``v2mount.stages.run_pipeline``). ``predict_postprocess`` runs ``predict`` on a
    batch and ``postprocess`` on each of its requests. Each answers per request (a
    result or that request's error), with the time its stages took; ``infer_staged``
    runs the whole chain of one request and raises its error. Errors of the whole call
    and cancellation as ``infer``.
    """

    async def run_gathered(self, take: Callable[[], Gathered]) -> Staged[list[Item]]: ...

    async def predict_postprocess(
        self, prepared: Sequence[InferenceRequest], originals: Sequence[InferenceRequest]
    ) -> Staged[list[Answered]]: ...

    async def infer_staged(self, request: InferenceRequest) -> Staged[InferenceResponse]: ...


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _call_from_thread(method: Callable[..., Any], *args: Any) -> Any:
    """Run a model method from a worker thread; an ``async`` one on the event loop."""
    result = method(*args)
    if inspect.isawaitable(result):
        return anyio.from_thread.run(_awaited, result)
    return result


class _InlinePolicy:
    """Chooses between the event loop and a worker thread for a plain ``predict``.

    A thread hop costs about 100 µs of CPU and more of latency, more than a tiny model's
    whole predict. After ``warmup`` threaded calls whose moving average is under
    ``budget`` seconds, calls run on the loop. ``STRIKES`` inline calls in a row slower
    than ``10 * budget``, or one slower than ``1000 * budget``, send them back to the
    thread, and the next warm-up is twice as long (up to ``MAX_WARMUP``): a model that
    turns slow blocks the loop for a few calls at most, one that keeps changing its mind
    costs less and less. A lone slow call (a garbage collection, the OS preempting the
    process on a busy machine: 150 ms seen) does not count: under load every trip to the
    thread costs each queued request a GIL hand-over, a long tail for nothing.
    ``budget == 0``: always the thread.
    """

    WARMUP = 20
    MAX_WARMUP = 20 * 2**9
    STRIKES = 3

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.inline = False
        self.warmup = self.WARMUP
        self._average = 0.0
        self._samples = 0
        self._strikes = 0

    def threaded(self, seconds: float) -> None:
        """Record a call made in the worker thread."""
        self._average = seconds if self._samples == 0 else 0.8 * self._average + 0.2 * seconds
        self._samples += 1
        if self._samples >= self.warmup and self._average < self.budget:
            self.inline, self._strikes = True, 0

    def inlined(self, seconds: float) -> None:
        """Record a call made on the event loop."""
        if seconds <= 10 * self.budget:
            self._strikes = 0
            return
        self._strikes += 1
        if self._strikes >= self.STRIKES or seconds > 1000 * self.budget:
            self.inline, self._samples = False, 0
            self.warmup = min(2 * self.warmup, self.MAX_WARMUP)


class _Late(TimeoutError):
    """A request that waited past its timeout, which its caller answers (the model
    never saw it; a ``TimeoutError`` the model raises is the model's error)."""


def _timed_predict(model: Model, request: InferenceRequest) -> tuple[InferenceResponse, float]:
    start = time.perf_counter()
    response = call_predict_sync(model, request)
    return response, time.perf_counter() - start


class InProcessRunner:
    """Runs the model in this process (``parallel_workers == 0``).

    ``inline_budget``: see ``_InlinePolicy`` (server setting ``inline_predict_budget``).
    """

    def __init__(
        self,
        model: Model,
        max_queue_size: int,
        metrics_sink: MetricsSink,
        inline_budget: float = 0.0,
    ) -> None:
        self._model = model
        self._max_queue_size = max_queue_size
        self._sink = metrics_sink
        self._limiter = anyio.CapacityLimiter(1)
        self._async = inspect.iscoroutinefunction(model.predict)
        self._policy = _InlinePolicy(inline_budget)
        self._turns = LoopTurns(inline_budget)
        self._pending = 0
        # Requests holding or waiting for the limiter (a plain count: reading the
        # limiter's ``borrowed_tokens`` twice per request costs more).
        self._limited = 0
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reason(self) -> str | None:
        return None if self._ready else "not loaded"

    @property
    def inline(self) -> bool:
        """Whether the next ``infer`` runs a plain predict on the event loop, awaiting
        nothing on the way but a turn of the loop (see ``_InlinePolicy``, ``LoopTurns``):
        pass ``infer`` the request's timeout instead of a cancel scope."""
        return not self._async and self._policy.inline and self._limited == 0

    async def start(self) -> None:
        try:
            await call_load(self._model)
        except Exception as exc:
            raise ModelNotReady(describe_exception(exc)) from exc
        finally:
            self._sink(self._model.metrics.drain())
        self._ready = True

    def _admit(self) -> None:
        """Count a call in, or refuse it (not loaded, or ``max_queue_size`` waiting)."""
        if not self._ready:
            raise ModelNotReady(f"model {self._model.settings.name!r} is not loaded")
        if self._pending >= self._max_queue_size:
            raise Overloaded(
                f"model {self._model.settings.name!r} has {self._pending} requests queued"
            )
        self._pending += 1

    async def infer(
        self, request: InferenceRequest, max_wait: float | None = None
    ) -> InferenceResponse:
        """``max_wait``: the request's timeout when the caller set no deadline (as
        ``inline`` allows); a wait for a turn of the loop checks it, a wait for the
        thread runs under it."""
        self._admit()
        try:
            if self._async:
                return await call_predict(self._model, request)
            if self._policy.inline and self._limited == 0:
                if not self._turns.free:
                    waited = time.monotonic()
                    await self._turns.wait()
                    if max_wait is not None and time.monotonic() - waited > max_wait:
                        raise _Late  # checked once its turn came: a wait of a few turns
                if self._limited == 0:  # else a threaded call started meanwhile: line up
                    return self._predict_inline(request)
            self._limited += 1
            try:
                deadline = anyio.move_on_after(max_wait)
                with deadline:
                    if self._policy.inline:
                        # A threaded call is still running: wait for it, in line (the
                        # limiter is first come, first served), then predict here.
                        # Sending this request to the thread instead would keep the
                        # model there for as long as requests keep queueing.
                        async with self._limiter:
                            return self._predict_inline(request)
                    response, seconds = await anyio.to_thread.run_sync(
                        _timed_predict, self._model, request, limiter=self._limiter
                    )
                if deadline.cancelled_caught:
                    raise _Late
            finally:
                self._limited -= 1
            self._policy.threaded(seconds)
            return response
        except (V2MountError, _Late):
            raise
        except Exception as exc:
            # Once per predict call (a batch's requests share it), as a pool's worker does.
            name, request_id = self._model.settings.name, request.id
            logger.error("model %r: predict raised (request id %s)", name, request_id, exc_info=exc)
            raise ModelError(describe_exception(exc)) from exc
        finally:
            self._pending -= 1
            self._sink(self._model.metrics.drain())

    async def run_gathered(self, take: Callable[[], Gathered]) -> Staged[list[Item]]:
        timings: Timings = []
        requests, whole, max_rows = take()
        model, call = self._model, _call_from_thread
        if whole:
            answers = await self._run_stage(
                functools.partial(run_pipeline, model, call, requests, max_rows, timings)
            )
            return list[Item](answers), timings
        prepared = await self._run_stage(
            functools.partial(run_preprocess_each, model, call, requests, timings)
        )
        return list[Item](prepared), timings

    async def predict_postprocess(
        self, prepared: Sequence[InferenceRequest], originals: Sequence[InferenceRequest]
    ) -> Staged[list[Answered]]:
        timings: Timings = []
        run = functools.partial(
            run_predict_postprocess, self._model, _call_from_thread, prepared, originals, timings
        )
        return await self._run_stage(run), timings

    async def infer_staged(self, request: InferenceRequest) -> Staged[InferenceResponse]:
        timings: Timings = []
        run = functools.partial(run_pipeline, self._model, _call_from_thread, [request], 1, timings)
        (answer,) = await self._run_stage(run)
        if isinstance(answer, V2MountError):
            raise answer
        return answer, timings

    async def _run_stage(self, run: Callable[[], T]) -> T:
        """Run stages in the model's worker thread (one model call at a time, as in a
        worker process); ``async`` methods among them run on the event loop."""
        self._admit()
        try:
            return await anyio.to_thread.run_sync(run, limiter=self._limiter)
        finally:
            self._pending -= 1
            self._sink(self._model.metrics.drain())

    def _predict_inline(self, request: InferenceRequest) -> InferenceResponse:
        start = time.perf_counter()
        try:
            return call_predict_sync(self._model, request)
        finally:
            seconds = time.perf_counter() - start
            self._policy.inlined(seconds)
            self._turns.spend(seconds)

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
