"""Pools reached from the event loop: ``SharedPool`` and its members, and ``WorkerPool``.

A ``SharedPool`` is N worker processes that each load every model of the pool; each
model is a ``PoolMember`` (a ``v2mount.runner.Runner``). ``WorkerPool`` is a model with a
pool of its own: the member of a private pool that stops with it.

A request's task takes an idle worker that has its model (or waits for one in the
pool's queue), writes the request frame to the worker's channel and reads the reply
itself, awaiting the channel's descriptor through anyio (asyncio or trio): no thread
stands between a request and its worker. Callers may run on any event loop, successive
calls on different ones: nothing here is bound to a loop. The pool's supervisor thread
(``_supervisor.py``) does all that is not per request.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar, cast

import anyio
import multiprocess

from v2mount.errors import BadRequest, BrokenWorker, InferenceTimeout, ModelNotReady, V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._config import PoolConfig
from v2mount.pool._ipc import decode_reply, encode_request
from v2mount.pool._lifecycle import LIVE
from v2mount.pool._stage_frames import (
    decode_stage_reply,
    encode_gathered,
    encode_predict_postprocess,
)
from v2mount.pool._state import (
    GONE,
    JOINING,
    LEAVING,
    NEW,
    STARTING,
    STOPPED,
    STOPPING,
    Member,
    PoolState,
    Ticket,
    Worker,
    fire,
)
from v2mount.pool._supervisor import Supervisor
from v2mount.pool._waiter import Waiter
from v2mount.runner import Declared, MetricsSink, RunnerStatistics
from v2mount.stages import Answered, Gathered, Item, Staged
from v2mount.stats import mark_started
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["PoolConfig", "PoolMember", "SharedPool", "WorkerPool"]

#: Frames carry a member's slot in 16 bits.
_MAX_SLOT = (1 << 16) - 1

T = TypeVar("T")
#: Builds a frame from its sequence number and the worker's arena.
Encode = Callable[[int, Arena | None], bytes]
#: Reads a reply frame: (sequence number, outcome or error, custom-metric updates).
Decode = Callable[[bytearray, Arena | None], tuple[int, T | V2MountError, list[MetricUpdate]]]


def _unlink_all(owner: int, paths: Iterable[str]) -> None:
    """At interpreter exit without ``stop``: remove whatever arenas are left.

    Not in a forked copy of the process, whose exit must not touch the owner's arenas.
    """
    if os.getpid() == owner:
        for path in list(paths):
            unlink_quietly(path)


class _Lost(Exception):
    """The request never reached the worker whole: another worker may take it."""


class SharedPool:
    """Worker processes that several models share, each worker loading every one.

    ``member(model, config)`` adds a model and returns its runner. The pool starts with
    its first member's ``start`` (loading every member added by then in each worker) and
    stops when its last member stops; a member added to a running pool is loaded by each
    live worker (and by every worker started later), one that stops is dropped by each.

    The pool's size and per-worker limits (``workers``, ``threads_per_worker``, recycling,
    ``shm_threshold``) are the pool's: the largest ``workers`` of the members added before
    it starts, the rest as its first member says; a member that asks for other limits, or
    joins a running pool asking for more workers, fails to start with the reason. Each
    member's ``max_queue_size`` and ``hard_timeout`` are its own. ``shared=False``: the
    private pool of one model (``WorkerPool``), whose messages name the model.

    Called from event loops (any, successive calls on different ones); ``metrics_sink``
    is called from request tasks and from the pool's supervisor thread.
    """

    def __init__(
        self, name: str, config: PoolConfig, *, metrics_sink: MetricsSink, shared: bool = True
    ) -> None:
        self.name = name
        self._state = PoolState(name, config, shared=shared)
        self._sink = metrics_sink
        self._seq = itertools.count()
        self._slots = itertools.count()
        self._supervisor: Supervisor | None = None

    @property
    def closed(self) -> bool:
        """Stopping or stopped: a model added now would never load."""
        return self._state.phase in (STOPPING, STOPPED)

    def member(self, model: Model, config: PoolConfig) -> PoolMember:
        """Add ``model`` to the pool (without loading it: its ``start`` does)."""
        member = Member(next(self._slots), model, config)
        state = self._state
        with state.lock:
            conflict = self._conflict(config)
            if conflict is None and member.slot > _MAX_SLOT:
                conflict = f"{state.label} has had {_MAX_SLOT} models already"
            if conflict is not None:
                member.phase = GONE
                member.reason = f"model {member.name!r} cannot share {state.label}: {conflict}"
            else:
                if state.phase == NEW and config.workers > state.config.workers:
                    state.config = dataclasses.replace(state.config, workers=config.workers)
                state.members[member.slot] = member
        return PoolMember(self, member)

    def _conflict(self, config: PoolConfig) -> str | None:
        """Why a model with ``config`` cannot be served by this pool (lock held)."""
        ours = self._state.config
        if self._state.phase != NEW and config.workers > ours.workers:
            return (
                f"it asks for {config.workers} workers (parallel_workers) and the running "
                f"pool has {ours.workers}"
            )
        for field in (
            "threads_per_worker",
            "max_requests_per_worker",
            "max_worker_memory_mb",
            "shm_threshold",
        ):
            theirs, pool = getattr(config, field), getattr(ours, field)
            if theirs != pool:
                return f"its {field} is {theirs}, the pool's is {pool}"
        return None

    def pids(self) -> list[int]:
        """Process ids of the workers currently alive (loading or loaded)."""
        with self._state.lock:
            return [worker.pid for worker in self._state.workers.values()]

    def loaded(self) -> dict[int, set[str]]:
        """The models each serving worker has loaded, by pid (``name`` or ``name:version``)."""
        with self._state.lock:
            names = {
                slot: m.name
                if m.model.settings.version is None
                else f"{m.name}:{m.model.settings.version}"
                for slot, m in self._state.members.items()
            }
            return {
                w.pid: {names[s] for s in w.slots if s in names}
                for w in self._state.workers.values()
                if w.phase in LIVE
            }

    # -- called by members ------------------------------------------------------------------

    def _launch(self) -> None:
        """Start the supervisor thread (lock held, pool ``NEW``)."""
        state = self._state
        state.phase = STARTING
        state.reason = f"{state.label} is loading"
        state.open_wake_pipe()
        arena_paths: set[str] = set()
        self._supervisor = supervisor = Supervisor(
            state,
            context=multiprocess.get_context("spawn"),
            metrics_sink=self._sink,
            arena_paths=arena_paths,
            file_name=self.name,
        )
        # Tied to the supervisor, which its thread keeps alive while any arena exists.
        weakref.finalize(supervisor, _unlink_all, os.getpid(), arena_paths)
        threading.Thread(
            target=supervisor.run, name=f"v2mount-pool-{self.name}", daemon=True
        ).start()

    async def _stop(self) -> None:
        """Stop every worker and remove every arena; idempotent, shielded from cancellation.

        Queued requests fail with ``ModelNotReady``; running ones get ``STOP_GRACE``
        seconds to finish, then workers get ``EXIT_GRACE`` seconds to exit before SIGKILL.
        """
        state = self._state
        with anyio.CancelScope(shield=True):
            waiter = Waiter()
            with state.lock:
                if state.phase == NEW:
                    state.phase = STOPPED
                    state.reason = f"{state.label} is stopped"
                    for member in state.members.values():
                        member.phase, member.reason = GONE, state.reason
                    state.members.clear()
                if state.phase == STOPPED:
                    return
                state.stop_waiters.append(waiter)
                dropped = state.begin_stop()
            fire(dropped)
            await waiter.wait()


class PoolMember:
    """One model served by a ``SharedPool`` (implements ``v2mount.runner.Runner``).

    The unloaded model is pickled with dill and loaded once in each worker of the pool.
    A request goes to an idle live worker that has the model loaded (each worker runs
    one request at a time, so an idle one is a least-loaded one) or waits in the pool's
    bounded queue (at most the member's ``max_queue_size`` of its requests). A dead
    worker is replaced at once, and its replacement loads every model of the pool.

    All methods are called from an event loop (asyncio or trio); successive calls may
    come from different loops.
    """

    def __init__(self, pool: SharedPool, member: Member) -> None:
        self._pool = pool
        self._member = member
        self._state = pool._state

    @property
    def pool(self) -> SharedPool:
        return self._pool

    @property
    def ready(self) -> bool:
        """True while at least one live worker has the model loaded."""
        return self._state.ready(self._member)

    @property
    def reason(self) -> str | None:
        """Why the model is not served (the load error, a stop, a restart), else ``None``."""
        return None if self.ready else self._state.reason_of(self._member)

    async def start(self) -> Declared | None:
        """Load the model in the pool's workers (starting the pool if it is not yet).

        Returns once each worker asked has loaded it or failed to: the inputs and outputs
        the model's ``load`` declared in a worker, if it changed them (for the caller to
        serve as metadata), once at least one worker loaded it; otherwise raises
        ``ModelNotReady`` carrying the load error (and the model leaves the pool; a pool
        left with no model stops). Cancelling ``start`` takes the model out again.
        """
        state, member = self._state, self._member
        with state.lock:
            if member.phase is JOINING:
                if state.phase == NEW:
                    self._pool._launch()
                elif state.phase in (STOPPING, STOPPED):
                    member.phase, member.reason = GONE, state.reason
                    state.members.pop(member.slot, None)
                else:
                    state.wake()  # the supervisor takes it up
            waiter = Waiter() if member.phase is JOINING else None
            if waiter is not None:
                member.waiters.append(waiter)
        try:
            if waiter is not None:
                await waiter.wait()
        except BaseException:
            await self.stop()
            raise
        if member.phase is GONE:
            reason = member.reason
            await self.stop()
            raise ModelNotReady(reason)
        if member.declared is None:
            return None
        return Declared.from_wire(*member.declared)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer one request in a worker process.

        Raises ``Overloaded`` when ``max_queue_size`` requests already wait,
        ``ModelNotReady`` when no live worker has the model, ``BrokenWorker`` when the
        worker died while running this request, ``InferenceTimeout`` when it was killed
        past ``hard_timeout``, ``ModelError`` (or the model's own ``V2MountError``) when
        predict raised. Cancellation withdraws a queued request; a running one finishes
        in its worker (the supervisor reads and drops its reply).
        """
        threshold, slot = self._state.config.shm_threshold, self._member.slot
        return await self._call(
            lambda seq, arena: encode_request(request, seq, arena, threshold, slot=slot),
            decode_reply,
        )

    async def run_gathered(self, take: Callable[[], Gathered]) -> Staged[list[Item]]:
        """Run the stages of the requests ``take()`` returns in one worker, one trip.

        ``take`` is called on the event loop once a worker is held, and again (it must
        return the same) if that worker died before it had the frame: requests that come
        while the call waits for a worker can still join it. Returns per request what
        ``preprocess`` made of it, or its answer when the call ran its whole chain, or
        its error; errors of the whole call as ``infer``.
        """
        threshold, slot = self._state.config.shm_threshold, self._member.slot
        items, timings = await self._call(
            lambda seq, arena: encode_gathered(take(), seq, arena, threshold, slot),
            decode_stage_reply,
        )
        return items, timings

    async def predict_postprocess(
        self, prepared: Sequence[InferenceRequest], originals: Sequence[InferenceRequest]
    ) -> Staged[list[Answered]]:
        """``predict`` on a batch of preprocessed requests, then ``postprocess`` on each
        request's rows, in one trip to a worker: a response or the error per request
        (``predict``'s error raises, for the whole batch)."""
        threshold, slot = self._state.config.shm_threshold, self._member.slot
        items, timings = await self._call(
            lambda seq, arena: encode_predict_postprocess(
                prepared, originals, seq, arena, threshold, slot
            ),
            decode_stage_reply,
        )
        return cast(list[Answered], items), timings

    async def infer_staged(self, request: InferenceRequest) -> Staged[InferenceResponse]:
        """preprocess → predict → postprocess on one request, in one trip to a worker."""
        threshold, slot = self._state.config.shm_threshold, self._member.slot
        gathered = Gathered([request], whole=True)
        (answer,), timings = await self._call(
            lambda seq, arena: encode_gathered(gathered, seq, arena, threshold, slot),
            decode_stage_reply,
        )
        if isinstance(answer, V2MountError):
            raise answer
        assert isinstance(answer, InferenceResponse)
        return answer, timings

    async def _call(self, encode: Encode, decode: Decode[T]) -> T:
        """One frame to an idle worker that has the model, and its reply's outcome (see
        ``infer``)."""
        while True:
            worker = await self._worker()
            try:
                return await self._exchange(worker, encode, decode)
            except _Lost:
                continue  # the worker died before it had the request: try another

    async def _worker(self) -> Worker:
        """A worker held for this task: an idle one, or the first one freed for its ticket."""
        got = self._state.acquire(self._member)
        if not isinstance(got, Ticket):
            return got
        try:
            await got.waiter.wait()
        except BaseException:
            self._state.withdraw(got)
            raise
        if got.error is not None:
            raise got.error
        assert got.worker is not None
        return got.worker

    async def _exchange(self, worker: Worker, encode: Encode, decode: Decode[T]) -> T:
        """Send a frame to a held worker and read its reply, here, on the event loop."""
        state, seq = self._state, next(self._pool._seq)
        mark_started()  # the request stops waiting in the pool's queue
        try:
            frame = encode(seq, worker.process.arena)
        except Exception as exc:
            state.release(worker, None)
            raise BadRequest(f"the request cannot be sent to a worker: {exc}") from None
        channel = worker.channel
        channel.begin(frame)
        del frame
        worker.busy_since = time.monotonic()
        reply: bytearray | None = None
        try:
            try:
                while not channel.write_some():
                    await anyio.wait_writable(channel.fd)
            except OSError:
                state.let_go(worker)
                raise _Lost from None
            try:
                while (reply := channel.read_some()) is None:
                    await anyio.wait_readable(channel.fd)
            except (EOFError, OSError, ValueError):
                pass  # the worker ended: see below
        except BaseException as exc:
            if not isinstance(exc, _Lost):
                state.drain(worker)  # cancelled: the supervisor reads the reply
            raise
        if reply is None:
            raise await self._broken(worker)
        try:
            answered, outcome, updates = decode(reply, worker.process.arena)
            if answered != seq:
                raise ValueError(f"reply to request {answered}, not {seq}")
        except Exception:
            state.let_go(worker)  # the supervisor retires it
            raise BrokenWorker(f"{worker.where} sent a reply that cannot be read") from None
        del reply
        worker.served += 1
        supervisor = self._pool._supervisor
        assert supervisor is not None
        state.release(worker, supervisor.policy.worn_out(worker))
        if updates:
            self._pool._sink(updates)
        if isinstance(outcome, V2MountError):
            raise outcome
        return outcome

    async def _broken(self, worker: Worker) -> V2MountError:
        """The error for a request whose worker ended under it (the task lets go of it).

        Only the supervisor signals and reaps processes; it tells how this one ended.
        """
        try:
            how = self._state.exit_of(worker)
            if isinstance(how, Waiter):
                # Not shielded: a cancelled caller (its deadline) stops waiting here too.
                await how.wait()
                how = worker.exit or "ended"
        finally:
            self._state.let_go(worker)
        where = worker.where
        if worker.timed_out:
            return InferenceTimeout(
                f"{where} ran this request for more than {self._member.config.hard_timeout} s "
                "and was killed"
            )
        if self._state.phase in (STOPPING, STOPPED):
            return BrokenWorker(f"{where} was stopped while running this request")
        return BrokenWorker(f"{where} {how} while running this request")

    async def stop(self) -> None:
        """Take the model out of the pool: each worker drops it and frees its memory.

        The last model out stops the pool (see ``SharedPool``). Requests still queued for
        the model fail with ``ModelNotReady``. Idempotent, shielded from cancellation.
        """
        state, member = self._state, self._member
        with anyio.CancelScope(shield=True):
            waiter: Waiter | None = None
            with state.lock:
                others = any(
                    m is not member and m.phase is not LEAVING for m in state.members.values()
                )
                if others and state.phase == NEW:
                    member.phase, member.reason = GONE, "unloaded"
                    state.members.pop(member.slot, None)
                    return
                if others and state.members.get(member.slot) is member:
                    waiter = Waiter()
                    member.waiters.append(waiter)
                    if member.phase is not LEAVING:
                        member.phase = LEAVING
                        member.reason = f"model {member.name!r} is unloading"
                        dropped = state.take_queue(ModelNotReady(member.reason), member)
                        state.leaving.append(member)
                        state.wake()
                    else:
                        dropped = []
                elif others:
                    return  # out already (or never in)
            if waiter is None:
                await self._pool._stop()
                return
            fire(dropped)
            await waiter.wait()

    def statistics(self) -> RunnerStatistics:
        return self._state.statistics(self._member)

    def pids(self) -> list[int]:
        """Process ids of the pool's workers currently alive (loading or loaded)."""
        return self._pool.pids()


class WorkerPool(PoolMember):
    """Runs a model in worker subprocesses of its own (implements ``v2mount.runner.Runner``).

    ``config`` says how many, and how they are limited (see ``PoolConfig``); the pool
    starts with ``start`` and stops with ``stop``.
    """

    def __init__(self, model: Model, config: PoolConfig, *, metrics_sink: MetricsSink) -> None:
        pool = SharedPool(model.settings.name, config, metrics_sink=metrics_sink, shared=False)
        member = pool.member(model, config)
        super().__init__(pool, member._member)
