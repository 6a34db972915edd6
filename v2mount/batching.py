"""Adaptive batching: merge concurrent compatible requests into one model call.

A request joins the open batch for its *compatibility key* (input names, datatypes,
trailing dimensions, per-input and request parameters, minus pure-encoding keys) and the
event loop it came from. A batch goes when it holds ``max_batch_size`` rows or when its
oldest request has waited ``max_batch_time`` seconds. Its inputs are concatenated along
axis 0, the runner answers the merged request once, and each output is split back by
row counts.

Each batch is driven by its own short-lived task, detached from every caller (an
asyncio task, or a trio system task). So a caller that is cancelled (timeout, client
gone) returns at once without cancelling the batch its neighbours wait on, and nothing
outlives the batch: no background task or event is bound to a loop, so successive
requests may come from different event loops (Starlette's ``TestClient`` without
``with``). Several batches may be in flight at once; a pool of N workers runs N of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import threading
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from v2mount.errors import ModelError, V2MountError
from v2mount.runner import Runner
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

try:
    import sniffio
except ModuleNotFoundError:  # pragma: no cover - trio needs sniffio, so only asyncio is possible
    sniffio = None  # type: ignore[assignment]

__all__ = ["AdaptiveBatcher", "BatcherStatistics"]

#: Parameters that only say how tensors travel on the wire; they never split batches.
ENCODING_KEYS = frozenset({"binary_data_output", "binary_data_size"})


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a batcher, read by metrics (``batch_request_queue``) and tests.

    ``queued_*`` count requests waiting in batches not yet dispatched; ``batches``,
    ``batched_requests`` and ``unbatched_requests`` are totals since construction.
    """

    queued_requests: int
    queued_rows: int
    batches: int
    in_flight_batches: int
    batched_requests: int
    unbatched_requests: int
    max_batch_size: int
    max_batch_time: float


@dataclass(eq=False, slots=True)
class _Member:
    request: InferenceRequest
    rows: int
    response: InferenceResponse | None = None
    error: BaseException | None = None


@dataclass(eq=False, slots=True)
class _Batch:
    key: Hashable
    deadline: float
    wake: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    dispatched: bool = False


class AdaptiveBatcher:
    """Wraps a ``Runner`` and offers the same ``infer``, batching concurrent requests.

    ``infer`` may be called from any task of any event loop (asyncio or trio), and from
    several loops in several threads at once; requests merge only with requests from the
    same loop. Cancelling ``infer`` returns at once: a request whose batch has not gone
    yet leaves it, otherwise its share of the answer is dropped; the others in its batch
    are answered either way. ``on_batch(rows)`` is called once per batch formed, in the
    loop's thread, just before the batch is dispatched.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int,
        max_batch_time: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_batch_time < 0:
            raise ValueError(f"max_batch_time must not be negative, not {max_batch_time}")
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_batch_time = max_batch_time
        self._on_batch = on_batch
        # Guards the open batches and counters: loops in different threads may share us.
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued_requests = 0
        self._queued_rows = 0
        self._batches = 0
        self._in_flight = 0
        self._batched = 0
        self._unbatched = 0

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer ``request``, merged with compatible concurrent requests when possible.

        Returns every output the model produced, under ``request.id``; raises the
        ``V2MountError`` that its batch's model call raised.
        """
        rows = batch_rows(request)
        key = None
        if rows is not None and 0 < rows <= self._max_batch_size:
            key = compatibility_key(request)
        if rows is None or key is None:
            with self._lock:
                self._unbatched += 1
            return await self._runner.infer(request)
        member = _Member(request, rows)
        batch = self._join((_current_loop(), key), member)
        try:
            await batch.done.wait()
        except BaseException:
            self._leave(batch, member)
            raise
        if member.error is not None:
            raise _fresh(member.error)
        if member.response is None:
            raise ModelError("the batch was cancelled before it was answered")
        return member.response

    def statistics(self) -> BatcherStatistics:
        with self._lock:
            return BatcherStatistics(
                queued_requests=self._queued_requests,
                queued_rows=self._queued_rows,
                batches=self._batches,
                in_flight_batches=self._in_flight,
                batched_requests=self._batched,
                unbatched_requests=self._unbatched,
                max_batch_size=self._max_batch_size,
                max_batch_time=self._max_batch_time,
            )

    def _join(self, key: Hashable, member: _Member) -> _Batch:
        """Add ``member`` to the open batch for ``key``, opening (and driving) a new one."""
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.rows + member.rows > self._max_batch_size:
                self._close(batch)
                batch = None
            new = batch is None
            if batch is None:
                batch = _Batch(key, anyio.current_time() + self._max_batch_time)
                self._open[key] = batch
            batch.members.append(member)
            batch.rows += member.rows
            self._queued_requests += 1
            self._queued_rows += member.rows
            if batch.rows >= self._max_batch_size:
                self._close(batch)
        if new:
            self._spawn(functools.partial(self._drive, batch))
        return batch

    def _leave(self, batch: _Batch, member: _Member) -> None:
        """A cancelled caller takes its rows out of a batch that has not gone yet."""
        with self._lock:
            if batch.dispatched or member not in batch.members:
                return
            batch.members.remove(member)
            batch.rows -= member.rows
            self._queued_requests -= 1
            self._queued_rows -= member.rows
            if not batch.members:
                self._close(batch)

    def _close(self, batch: _Batch) -> None:
        """Stop ``batch`` taking members and wake its driver (lock held)."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.wake.set()

    def _spawn(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``function()`` in a task of the current loop that no caller owns."""
        if _is_trio():
            import trio

            trio.lowlevel.spawn_system_task(function, context=contextvars.copy_context())
            return
        task = asyncio.get_running_loop().create_task(function())
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, batch: _Batch) -> None:
        """Wait for the batch to fill or time out, then run it; never raises ``Exception``."""
        try:
            with anyio.move_on_at(batch.deadline):
                await batch.wake.wait()
            with self._lock:
                self._close(batch)
                batch.dispatched = True
                members = batch.members
                self._queued_requests -= len(members)
                self._queued_rows -= batch.rows
                if members:
                    self._batches += 1
                    self._batched += len(members)
                    self._in_flight += 1
            if members:
                try:
                    await self._run(members, batch.rows)
                finally:
                    with self._lock:
                        self._in_flight -= 1
        finally:
            batch.done.set()

    async def _run(self, members: list[_Member], rows: int) -> None:
        try:
            if self._on_batch is not None:
                self._on_batch(rows)
            merged = members[0].request if len(members) == 1 else merge_requests(members)
            response = await self._runner.infer(merged)
            parts = split_response(response, members)
        except Exception as exc:
            error = exc if isinstance(exc, V2MountError) else ModelError(f"{exc!r}")
            for member in members:
                member.error = error
        else:
            for member, part in zip(members, parts, strict=True):
                member.response = part


def batch_rows(request: InferenceRequest) -> int | None:
    """The request's row count (``shape[0]`` of every input), or ``None`` if it has none."""
    rows = None
    for tensor in request.inputs:
        if tensor.data.ndim == 0 or rows not in (None, tensor.data.shape[0]):
            return None
        rows = tensor.data.shape[0]
    return rows


def compatibility_key(request: InferenceRequest) -> Hashable | None:
    """What must be equal for two requests to share a model call (``None``: unhashable)."""
    try:
        key = (
            tuple(
                (t.name, t.datatype, t.data.dtype.str, t.data.shape[1:], _freeze(t.parameters))
                for t in request.inputs
            ),
            _freeze(request.parameters),
        )
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a parameter value; the type is kept so ``1 != True``."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items() if k not in ENCODING_KEYS))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v) for v in value))
    return (type(value).__name__, value)


def merge_requests(members: list[_Member]) -> InferenceRequest:
    """One request holding every member's rows, in order, asking for all outputs."""
    first = members[0].request
    inputs = []
    for index, tensor in enumerate(first.inputs):
        data = np.concatenate([m.request.inputs[index].data for m in members], axis=0)
        inputs.append(
            Tensor(tensor.name, tensor.datatype, data.shape, data, dict(tensor.parameters))
        )
    parameters = {k: v for k, v in first.parameters.items() if k not in ENCODING_KEYS}
    return InferenceRequest(inputs, None, parameters, None)


def split_response(response: InferenceResponse, members: list[_Member]) -> list[InferenceResponse]:
    """Cut every output back into each member's rows (views, no copies)."""
    total = sum(m.rows for m in members)
    for tensor in response.outputs:
        if tensor.data.ndim == 0 or tensor.data.shape[0] != total:
            raise ModelError(
                f"adaptive batching: output {tensor.name!r} has shape {list(tensor.data.shape)}"
                f" but the batch has {total} rows; with batching on, every output must have"
                f" one row per input row"
            )
    parts = []
    start = 0
    for member in members:
        stop = start + member.rows
        outputs = [
            Tensor(
                t.name,
                t.datatype,
                (member.rows, *t.data.shape[1:]),
                t.data[start:stop],
                dict(t.parameters),
            )
            for t in response.outputs
        ]
        parts.append(
            InferenceResponse(
                response.model_name,
                outputs,
                response.model_version,
                member.request.id,
                dict(response.parameters),
            )
        )
        start = stop
    return parts


def _current_loop() -> Hashable:
    """Identifies the running event loop, so batches never span two loops."""
    if _is_trio():
        import trio

        return trio.lowlevel.current_trio_token()
    return asyncio.get_running_loop()


def _is_trio() -> bool:
    return sniffio is not None and sniffio.current_async_library() == "trio"


def _fresh(error: BaseException) -> BaseException:
    """A copy per waiting caller, so one exception's traceback is not grown by many raises."""
    try:
        clone = copy.copy(error)
    except Exception:
        return error
    clone.__cause__ = error.__cause__
    return clone
