"""The batcher: open batches per (event loop, compatibility key), run by tasks no caller owns."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import anyio

from v2mount.batching._loops import Spawner, current_loop, fresh
from v2mount.batching._tensors import (
    BatchAnswer,
    answer_alone,
    answer_batch,
    batch_rows,
    compatibility_key,
    split_outcome,
)
from v2mount.errors import ModelError, V2MountError
from v2mount.runner import Runner
from v2mount.stats import mark_started, started_at
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["AdaptiveBatcher", "BatcherStatistics"]


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a batcher, read by metrics (``batch_request_queue``) and tests.

    ``queued_*`` count requests waiting in batches that have not gone yet; ``batches``,
    ``batched_requests`` (requests that went in those batches) and ``unbatched_requests``
    (requests that ran alone) are totals since construction.
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
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    #: Taken out of the open batches (to run, or because every member left).
    taken: bool = False
    #: When the batch left its queues (the batch's, then the runner's): ``perf_counter_ns``.
    started: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class AdaptiveBatcher:
    """Wraps a ``Runner`` and offers the same ``infer``, batching concurrent requests.

    ``infer`` may be called from any task of any event loop (asyncio or trio), and from
    loops in several threads at once; requests merge only with requests of the same loop.
    Cancelling ``infer`` returns at once: a request whose batch has not gone yet leaves
    it, otherwise its share of the answer is dropped; the rest of its batch is answered
    either way. ``on_batch(rows)`` is called once per batch, on the loop's thread, just
    before the batch goes to the runner. ``answer``, when given, answers each batch (and
    each request that runs alone) instead of the runner's ``infer``.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int,
        max_batch_time: float,
        on_batch: Callable[[int], None] | None = None,
        answer: BatchAnswer | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_batch_time < 0:
            raise ValueError(f"max_batch_time must not be negative, not {max_batch_time}")
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_batch_time = max_batch_time
        self._on_batch = on_batch
        self._answer = answer
        # Guards the open batches and the counters: loops in several threads may share us.
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self._spawner = Spawner()
        self._queued_requests = 0
        self._queued_rows = 0
        self._batches = 0
        self._in_flight = 0
        self._batched = 0
        self._unbatched = 0

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer ``request``, merged with compatible concurrent requests when possible.

        Returns every output the model produced, under ``request.id``; raises the
        ``V2MountError`` that the model call of its batch raised.
        """
        rows = batch_rows(request)
        key = None
        if rows is not None and 0 < rows < self._max_batch_size:
            key = compatibility_key(request)
        if rows is None or key is None:
            with self._lock:
                self._unbatched += 1
            return await answer_alone(self._runner, self._answer, request)
        loop, trio = current_loop()
        member = _Member(request, rows)
        batch = self._join((loop, key), member, trio)
        try:
            await batch.done.wait()
        except BaseException:
            self._leave(batch, member)
            raise
        if batch.started is not None:
            mark_started(batch.started)
        if member.error is not None:
            raise fresh(member.error)
        if member.response is None:
            raise ModelError("the batch was cancelled (its event loop is closing)")
        return member.response

    def statistics(self) -> BatcherStatistics:
        """A consistent snapshot; safe to call from any thread."""
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

    def _join(self, key: Hashable, member: _Member, trio: bool) -> _Batch:
        """Add ``member`` to the open batch for ``key`` (opening one), sending full ones."""
        ready = []
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.rows + member.rows > self._max_batch_size:
                self._take(batch)
                ready.append(batch)
                batch = None
            opened = batch is None
            if batch is None:
                batch = _Batch(key, anyio.current_time() + self._max_batch_time)
                self._open[key] = batch
            batch.members.append(member)
            batch.rows += member.rows
            self._queued_requests += 1
            self._queued_rows += member.rows
            if batch.rows >= self._max_batch_size:
                self._take(batch)
                ready.append(batch)
        if opened:
            self._spawner.spawn(functools.partial(self._expire, batch), trio)
        for full in ready:
            self._spawner.spawn(functools.partial(self._run, full), trio)
        return batch

    def _leave(self, batch: _Batch, member: _Member) -> None:
        """A cancelled caller takes its rows out of a batch that has not gone yet."""
        with self._lock:
            if batch.taken:
                return
            batch.members.remove(member)
            batch.rows -= member.rows
            self._queued_requests -= 1
            self._queued_rows -= member.rows
            if not batch.members:
                self._take(batch)

    def _take(self, batch: _Batch) -> None:
        """Close ``batch`` to newcomers and leavers (lock held)."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.taken = True
        self._queued_requests -= len(batch.members)
        self._queued_rows -= batch.rows

    async def _expire(self, batch: _Batch) -> None:
        """Send ``batch`` at its deadline unless it went (or emptied) before.

        A plain sleep, not a wait cancelled at the deadline: far cheaper, and a batch
        that fills early is sent by the request that filled it.
        """
        try:
            await anyio.sleep_until(batch.deadline)
        except BaseException:  # the loop is closing: no member may wait for ever
            with self._lock:
                if not batch.taken:
                    self._take(batch)
            batch.done.set()
            raise
        with self._lock:
            if batch.taken:
                return
            self._take(batch)
        await self._run(batch)

    async def _run(self, batch: _Batch) -> None:
        """Answer every member of ``batch`` with its rows or the error; raises nothing."""
        members = batch.members
        with self._lock:
            self._batches += 1
            self._batched += len(members)
            self._in_flight += 1
        error: Exception | None = None
        parts: Sequence[InferenceResponse | V2MountError] | None = None
        try:
            if self._on_batch is not None:
                self._on_batch(batch.rows)
            requests = [member.request for member in members]
            mark_started()
            rows = [member.rows for member in members]
            parts = await answer_batch(self._runner, self._answer, requests, rows)
            batch.started = started_at()
        except V2MountError as exc:
            error = exc
        except Exception as exc:  # a runner breaking its contract, or on_batch
            error = ModelError(f"{type(exc).__name__}: {exc}")
        finally:  # also when cancelled as the loop closes: then members get neither
            with self._lock:
                self._in_flight -= 1
            for index, member in enumerate(members):
                member.error, member.response = error, None
                if parts is not None:
                    member.error, member.response = split_outcome(parts[index])
            batch.done.set()
            batch.members = []  # the deadline task may hold the batch a little longer
