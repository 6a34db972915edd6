"""The way of one request through a model with stages (``v2mount.stages``), in the parent.

With batching on, requests share calls to the runner (a worker of the pool, or the
model's worker thread); each request is preprocessed and postprocessed apart. Requests
that arrive while a call waits for a worker join it (``_Gatherer``); when the call gets
its worker it leaves the requests that other idle workers can take now to another call,
so at low load they run in parallel. Then:

- with the plain window (no ``batching`` block), every call runs the whole chain of its
  requests: preprocess, ``predict`` on them merged, postprocess — one trip per batch,
  and batches grow with the load (requests gather while the workers are busy);
- with a ``batching`` block, a call runs the whole chain only when it gathered
  ``max_batch_size`` requests; otherwise it preprocesses them, the batcher merges them
  with others as it decides, and one call runs ``predict`` on each batch and
  ``postprocess`` on each of its requests (``answer_batch``).

A model with ``postprocess`` alone goes to the batcher. Without batching: the whole
chain in one call per request (one trip to a worker).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import anyio

from v2mount.batching._loops import Spawner, current_loop, fresh
from v2mount.batching._tensors import BatchAnswer
from v2mount.errors import ModelError, V2MountError
from v2mount.model import Model, has_postprocess
from v2mount.runner import StagedRunner
from v2mount.stages import Answered, Gathered, Item, Timings, has_preprocess
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["Executor", "Pipeline"]


class Executor(Protocol):
    """What answers a preprocessed request: a batcher or the runner itself."""

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...


B = TypeVar("B", bound=Executor)
Observe = Callable[[str, float], None]


class Pipeline(Generic[B]):
    """Offers ``infer`` like a runner, for a model with stages. Runs on the event loop.

    ``batching(answer)`` makes the batcher (``None``: batching off), given what answers
    its batches (``None`` when the model has no ``postprocess``: the runner's ``infer``
    does); ``group_size`` is ``max_batch_size``; ``whole``: every gathered call runs the
    whole chain (the batcher is not made for a model with ``preprocess``).
    ``observe(stage, seconds)`` is called for each stage a request ran. An error in
    ``preprocess`` or ``postprocess`` answers this request alone (a request whose
    preprocess failed never joins a batch); an error in a batched ``predict`` answers
    every request of its batch, with ``predict`` named in its text. Cancellation: as the
    runner's and the batcher's; a request cancelled while its call waits for a worker
    leaves the call.
    """

    def __init__(
        self,
        model: Model,
        runner: StagedRunner,
        batching: Callable[[BatchAnswer | None], B] | None,
        observe: Observe,
        *,
        group_size: int = 1,
        whole: bool = False,
    ) -> None:
        self._runner = runner
        self._observe = observe
        self._postprocess = has_postprocess(model)
        self._originals: dict[int, InferenceRequest] = {}
        self._batched = batching is not None
        self.batcher: B | None = None
        self._gatherer = None
        preprocess = has_preprocess(model)
        if batching is not None and preprocess:
            self._gatherer = _Gatherer(runner, max(1, group_size), whole, self._record)
        if batching is not None and not (preprocess and whole):
            self.batcher = batching(self.answer_batch if self._postprocess else None)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if not self._batched:
            response, timings = await self._runner.infer_staged(request)
            self._record(timings)
            return response
        prepared = request
        if self._gatherer is not None:
            gathered = await self._gatherer.run(request)
            if isinstance(gathered, InferenceResponse):
                return gathered  # its call ran the whole chain
            prepared = gathered
        batcher = self.batcher
        assert batcher is not None  # made unless every call runs the whole chain
        if self._postprocess:
            key = id(prepared)
            self._originals[key] = request
            try:
                return await batcher.infer(prepared)  # answer_batch names its errors
            finally:
                del self._originals[key]
        try:
            return await batcher.infer(prepared)
        except ModelError as exc:
            if type(exc) is not ModelError or exc.message.startswith("predict"):
                raise
            raise ModelError(f"predict failed: {exc.message}") from exc

    async def answer_batch(self, prepared: list[InferenceRequest]) -> list[Answered]:
        """``predict`` on a batch and ``postprocess`` on each of its requests, in one
        call to the runner (the batcher's ``answer``)."""
        originals = [self._originals[id(request)] for request in prepared]
        answers, timings = await self._runner.predict_postprocess(prepared, originals)
        self._record(timings)
        return answers

    def _record(self, timings: Timings) -> None:
        for stage, seconds in timings:
            self._observe(stage, seconds)


@dataclass(eq=False, slots=True)
class _Waiting:
    request: InferenceRequest
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Item | None = None


@dataclass(eq=False, slots=True)
class _Group:
    """Requests of one event loop sharing a preprocess call."""

    loop: Hashable
    trio: bool
    members: list[_Waiting] = field(default_factory=list)
    #: The requests the call took, once it took them: then nobody joins or leaves.
    taken: list[InferenceRequest] | None = None


class _Gatherer:
    """Gathers requests into preprocess calls (see the module). Called on event loops,
    from one or several threads; each loop has its own open group."""

    def __init__(
        self, runner: StagedRunner, limit: int, whole: bool, record: Callable[[Timings], None]
    ) -> None:
        self._runner = runner
        self._limit = limit
        self._whole = whole
        self._record = record
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Group] = {}
        self._spawner = Spawner()

    async def run(self, request: InferenceRequest) -> InferenceRequest | InferenceResponse:
        """The request preprocessed, or answered when its call ran the whole chain."""
        loop, trio = current_loop()
        waiting = _Waiting(request)
        with self._lock:
            group = self._open.get(loop)
            opened = group is None
            if group is None:
                group = self._open[loop] = _Group(loop, trio)
            group.members.append(waiting)
            if len(group.members) >= self._limit:
                del self._open[loop]  # full: it goes as it is, once it has its worker
        if opened:
            self._spawner.spawn(functools.partial(self._send, group), trio)
        try:
            await waiting.done.wait()
        except BaseException:
            with self._lock:
                if group.taken is None:
                    group.members.remove(waiting)
            raise
        outcome = waiting.outcome
        if outcome is None:
            raise ModelError("the preprocess call was cancelled (its event loop is closing)")
        if isinstance(outcome, V2MountError):
            raise fresh(outcome)
        return outcome

    def _idle_workers(self) -> int:
        statistics = self._runner.statistics()
        busy = statistics.in_flight - statistics.queued
        return max(0, statistics.live_workers - busy)

    def _take(self, group: _Group) -> Gathered:
        """Called on the loop when the group's call has its worker: close the group,
        leave to another call the share that other idle workers can take now, and say
        whether the call runs the whole chain."""
        if group.taken is not None:
            return self._gathered(group.taken)
        idle = self._idle_workers()
        spill = None
        with self._lock:
            if self._open.get(group.loop) is group:
                del self._open[group.loop]
            members = group.members
            share = math.ceil(len(members) / (idle + 1))
            if share < len(members):
                spill = _Group(group.loop, group.trio, members[share:])
                group.members = members[:share]
            group.taken = [waiting.request for waiting in group.members]
        if spill is not None:
            self._spawner.spawn(functools.partial(self._send, spill), spill.trio)
        return self._gathered(group.taken)

    def _gathered(self, requests: list[InferenceRequest]) -> Gathered:
        whole = self._whole or len(requests) >= self._limit
        return Gathered(requests, whole=whole, max_rows=self._limit)

    def _close(self, group: _Group) -> None:
        """Close the group if its call ended (failed) before taking it."""
        with self._lock:
            if group.taken is None:
                if self._open.get(group.loop) is group:
                    del self._open[group.loop]
                group.taken = [waiting.request for waiting in group.members]

    async def _send(self, group: _Group) -> None:
        """One call for the group; answers every member; raises nothing but the
        cancellation of a closing loop (then its members get no answer)."""
        results: Sequence[Item] | None = None
        error: V2MountError | None = None
        try:
            take = functools.partial(self._take, group)
            answers, timings = await self._runner.run_gathered(take)
            self._record(timings)
            if len(answers) != len(group.members):
                raise ModelError(f"{len(answers)} answers for {len(group.members)} requests")
            results = answers
        except V2MountError as exc:
            error = exc
        except Exception as exc:  # a runner breaking its contract
            error = ModelError(f"{type(exc).__name__}: {exc}")
        finally:
            self._close(group)
            for index, waiting in enumerate(group.members):
                waiting.outcome = results[index] if results is not None else error
                waiting.done.set()
