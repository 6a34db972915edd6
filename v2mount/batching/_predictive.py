"""The predictive batcher: batches timed from a fitted cost model, under a latency SLO."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import anyio

from v2mount.batching._cost import CostModel
from v2mount.batching._loops import Spawner, current_loop, fresh
from v2mount.batching._rate import ArrivalRate
from v2mount.batching._scheduler import Dispatch, Entry, Policy, Reason, Scheduler, Tally
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

__all__ = ["BatchReport", "PredictiveBatcher", "PredictiveStatistics", "runner_capacity"]


@dataclass(frozen=True, slots=True)
class PredictiveStatistics:
    """A snapshot of a ``PredictiveBatcher``, read by metrics and tests.

    ``dispatched_*`` count batches by why they went; ``refused`` requests answered 503
    at once (predicted late, or too many waiting); ``slo_misses`` requests answered after
    their deadline. ``intercept``, ``per_row`` and ``guard`` are the fitted batch cost in
    seconds (``None`` while fewer than ``min_samples`` batches ran). Totals count since
    construction.
    """

    queued_requests: int
    queued_rows: int
    batches: int
    in_flight_batches: int
    batched_requests: int
    unbatched_requests: int
    max_batch_size: int
    max_batch_time: float
    slo: float | None
    dispatched_full: int
    dispatched_deadline: int
    dispatched_idle: int
    refused: int
    slo_misses: int
    intercept: float | None
    per_row: float | None
    guard: float | None
    cost_samples: int


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What ``on_batch`` hears about a batch as it goes: its rows, why, and how long
    each of its requests waited in the batcher (seconds)."""

    rows: int
    reason: Reason
    queue_delays: Sequence[float]


@dataclass(eq=False, slots=True)
class _Member:
    request: InferenceRequest
    done: anyio.Event = field(default_factory=anyio.Event)
    response: InferenceResponse | None = None
    error: BaseException | None = None


@dataclass(eq=False, slots=True)
class _LoopState:
    """One event loop's queues and batches in flight, and its timer task."""

    loop: Hashable
    trio: bool
    scheduler: Scheduler[_Member]
    wake: float = float("inf")  # when the scheduler wants to be polled again
    timer: bool = False  # a timer task runs
    sleeping_until: float = float("inf")  # when the timer task wakes by itself
    poke: anyio.Event | None = None  # set to wake the timer task sooner


def runner_capacity(runner: Runner) -> Callable[[], int]:
    """Batches that may run at once: the pool's live workers, or one in-process.

    This reads ``Runner.statistics()`` each time. A pool that knows better (say, its idle
    workers, from its own event-loop dispatch) can pass its own callable as
    ``PredictiveBatcher(capacity=...)``; the batcher polls it after every arrival and
    every finished batch, so it must be cheap and callable on the event loop.
    """

    def capacity() -> int:
        statistics = runner.statistics()
        return max(1, statistics.live_workers) if statistics.workers else 1

    return capacity


class PredictiveBatcher:
    """Wraps a ``Runner`` and offers the same ``infer``; batches are timed by ``policy``.

    With ``policy.slo`` set, each request has a deadline (its arrival plus the SLO); the
    batcher fits the cost of a batch of ``b`` rows, ``L(b) = a + c·b``, from the batches it
    ran, and sends a batch when a worker is free and waiting for more would not pay or
    would break the oldest request's deadline (``v2mount.batching._scheduler``). A
    request predicted to finish after its deadline is refused at once with
    ``Overloaded`` (503 and ``Retry-After``); a request in a batch that went is never
    cancelled by the batcher. Without an SLO it is a fixed window of ``policy.max_wait``
    seconds that, with ``policy.idle_dispatch``, sends at once when a worker is free and
    no request is expected in time. Either way at most ``capacity()`` batches are in
    flight (default ``runner_capacity``): the others wait here, where they can still grow.

    ``infer`` may be called from any task of any event loop (asyncio or trio); requests
    merge only with requests of the same loop; loops in several threads may share one
    batcher. Cancelling ``infer`` returns at once: a request whose batch has not gone
    leaves the queue, otherwise its share of the answer is dropped. ``on_batch`` is called
    on the loop's thread just before a batch goes to the runner. ``clock`` is the time
    source in seconds (tests pass a virtual one); ``window`` and ``min_samples`` tune the
    cost fit (``CostModel``). ``answer``, when given, answers each batch (and each
    request that runs alone) instead of the runner's ``infer``.
    """

    def __init__(
        self,
        runner: Runner,
        policy: Policy,
        *,
        capacity: Callable[[], int] | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: int = 16,
        min_samples: int = 8,
        answer: BatchAnswer | None = None,
    ) -> None:
        self._runner = runner
        self._answer = answer
        self._policy = policy
        self._capacity = capacity if capacity is not None else runner_capacity(runner)
        self._on_batch = on_batch
        self._clock = clock
        self._cost = CostModel(window, min_samples)
        self._rate = ArrivalRate()
        self._tally = Tally()
        self._spawner = Spawner()
        # Guards the loop states, the cost model, the rate and the tally.
        self._lock = threading.Lock()
        self._states: dict[Hashable, _LoopState] = {}
        self._unbatched = 0

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer ``request``, merged with compatible concurrent requests when possible.

        Raises ``Overloaded`` at once when the request should not wait (see the class),
        or the ``V2MountError`` that the model call of its batch raised.
        """
        rows = batch_rows(request)
        key = None
        if rows is not None and 0 < rows < self._policy.max_batch_size:
            key = compatibility_key(request)
        if rows is None or key is None:
            with self._lock:
                self._unbatched += 1
            return await answer_alone(self._runner, self._answer, request)
        loop, trio = current_loop()
        member = _Member(request)
        with self._lock:
            state = self._states.get(loop)
            if state is None:
                scheduler = Scheduler[_Member](
                    self._policy, self._cost, self._rate, self._capacity, self._tally
                )
                state = self._states[loop] = _LoopState(loop, trio, scheduler)
            try:
                entry = state.scheduler.add(key, member, rows, self._clock())
            except V2MountError:
                self._forget_if_idle(state)
                raise
        self._pump(state)
        try:
            await member.done.wait()
        except BaseException:
            self._leave(state, entry)
            raise
        if member.error is not None:
            raise fresh(member.error)
        if member.response is None:
            raise ModelError("the batch was cancelled (its event loop is closing)")
        return member.response

    def statistics(self) -> PredictiveStatistics:
        """A consistent snapshot; safe to call from any thread."""
        with self._lock:
            fit = self._cost.fit()
            states = list(self._states.values())
            tally = self._tally
            return PredictiveStatistics(
                queued_requests=sum(s.scheduler.queued_requests for s in states),
                queued_rows=sum(s.scheduler.queued_rows for s in states),
                batches=sum(tally.dispatched.values()),
                in_flight_batches=sum(s.scheduler.in_flight for s in states),
                batched_requests=tally.batched_requests,
                unbatched_requests=self._unbatched,
                max_batch_size=self._policy.max_batch_size,
                max_batch_time=self._policy.max_wait,
                slo=self._policy.slo,
                dispatched_full=tally.dispatched["full"],
                dispatched_deadline=tally.dispatched["deadline"],
                dispatched_idle=tally.dispatched["idle"],
                refused=tally.refused,
                slo_misses=tally.slo_misses,
                intercept=None if fit is None else fit.intercept,
                per_row=None if fit is None else fit.per_row,
                guard=None if fit is None else fit.guard,
                cost_samples=0 if fit is None else fit.samples,
            )

    def _leave(self, state: _LoopState, entry: Entry[_Member]) -> None:
        """A cancelled caller leaves the queue if its batch has not gone yet."""
        with self._lock:
            state.scheduler.remove(entry)
            self._forget_if_idle(state)

    def _forget_if_idle(self, state: _LoopState) -> None:
        """Drop a loop's state when it holds nothing (lock held): a closed loop leaves
        nothing behind. The cost model and the arrival rate are the batcher's."""
        if state.scheduler.idle and not state.timer and self._states.get(state.loop) is state:
            del self._states[state.loop]

    def _pump(self, state: _LoopState) -> None:
        """Send what the scheduler says goes now, and arm the timer for its next poll.

        Called on the loop's thread after every event: an arrival, a finished batch, a
        timer.
        """
        with self._lock:
            sent, state.wake = state.scheduler.poll(self._clock())
            start_timer = state.wake != float("inf") and not state.timer
            state.timer = state.timer or start_timer
            poke = None
            if state.wake < state.sleeping_until:
                poke, state.poke = state.poke, None
            self._forget_if_idle(state)
        for dispatch in sent:
            self._spawner.spawn(functools.partial(self._run, state, dispatch), state.trio)
        if start_timer:
            self._spawner.spawn(functools.partial(self._timer, state), state.trio)
        elif poke is not None:
            poke.set()

    async def _timer(self, state: _LoopState) -> None:
        """Poll the scheduler when it asked to be polled, until nothing waits.

        ``_pump`` pokes it when the scheduler wants an earlier poll than it sleeps to.
        """
        try:
            while True:
                with self._lock:
                    if state.wake == float("inf"):
                        state.timer = False
                        self._forget_if_idle(state)
                        return
                    delay = state.wake - self._clock()
                    state.sleeping_until = state.wake
                    state.poke = poke = anyio.Event()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await poke.wait()
                with self._lock:
                    state.sleeping_until = float("inf")
                self._pump(state)
        except BaseException:  # the loop is closing: its callers are being cancelled too
            with self._lock:
                state.timer = False
                state.sleeping_until = float("inf")
            raise

    async def _run(self, state: _LoopState, dispatch: Dispatch[_Member]) -> None:
        """Answer every member of the batch with its rows or the error; raises nothing."""
        members = [entry.item for entry in dispatch.entries]
        error: Exception | None = None
        parts: Sequence[InferenceResponse | V2MountError] | None = None
        answered = False
        waited = 0.0
        try:
            if self._on_batch is not None:
                delays = [dispatch.sent - entry.arrived for entry in dispatch.entries]
                self._on_batch(BatchReport(dispatch.rows, dispatch.reason, delays))
            requests = [member.request for member in members]
            rows = [entry.rows for entry in dispatch.entries]
            mark_started()
            sent = started_at()
            parts = await answer_batch(self._runner, self._answer, requests, rows)
            answered = True
            # A pool says when a worker took the batch up: the wait before is not its cost.
            taken = started_at()
            if sent is not None and taken is not None:
                waited = max(0.0, (taken - sent) / 1e9)
        except V2MountError as exc:
            error = exc
        except Exception as exc:  # a runner breaking its contract, or on_batch
            error = ModelError(f"{type(exc).__name__}: {exc}")
        finally:  # also when cancelled as the loop closes: then members get neither
            with self._lock:
                state.scheduler.finished(dispatch, self._clock(), answered, waited)
            for index, member in enumerate(members):
                member.error, member.response = error, None
                if parts is not None:
                    member.error, member.response = split_outcome(parts[index])
                member.done.set()
        self._pump(state)  # a worker is free
