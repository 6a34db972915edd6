"""``WorkerPool``: a model served by N worker processes, reached from the event loop.

A request's task takes an idle worker (or waits for one in the pool's queue), writes the
request frame to the worker's channel and reads the reply itself, awaiting the channel's
descriptor through anyio (asyncio or trio): no thread stands between a request and its
worker. Callers may run on any event loop, successive calls on different ones: nothing
here is bound to a loop. The pool's supervisor thread (``_supervisor.py``) does all that
is not per request.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import anyio
import multiprocess

from v2mount.errors import BadRequest, BrokenWorker, InferenceTimeout, ModelNotReady, V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._config import PoolConfig
from v2mount.pool._ipc import PIPELINE, PREPROCESS, decode_reply, encode_request
from v2mount.pool._stage_frames import decode_stage_reply, encode_postprocess
from v2mount.pool._state import NEW, STARTING, STOPPED, STOPPING, PoolState, Ticket, Worker, fire
from v2mount.pool._supervisor import Supervisor
from v2mount.pool._waiter import Waiter
from v2mount.runner import Declared, MetricsSink, RunnerStatistics
from v2mount.stages import Staged
from v2mount.stats import mark_started
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["PoolConfig", "WorkerPool"]

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


class WorkerPool:
    """Runs a model in worker subprocesses (implements ``v2mount.runner.Runner``).

    The unloaded model is pickled with dill and loaded once in each worker; ``config``
    says how many, and how they are limited (see ``PoolConfig``). A request goes to an
    idle live worker (each runs one request at a time, so an idle one is a least-loaded
    one) or waits in one bounded queue. A dead worker is replaced at once.

    All methods are called from an event loop (asyncio or trio); successive calls may
    come from different loops. ``metrics_sink`` is called from request tasks and from
    the pool's supervisor thread, so it must be thread-safe.
    """

    def __init__(self, model: Model, config: PoolConfig, *, metrics_sink: MetricsSink) -> None:
        self._name = model.settings.name
        self._config = config
        self._sink = metrics_sink
        self._state = PoolState(self._name, config)
        self._seq = itertools.count()
        arena_paths: set[str] = set()
        self._supervisor = Supervisor(
            self._state,
            model,
            context=multiprocess.get_context("spawn"),
            metrics_sink=metrics_sink,
            arena_paths=arena_paths,
        )
        # Tied to the supervisor, which its thread keeps alive while any arena exists.
        weakref.finalize(self._supervisor, _unlink_all, os.getpid(), arena_paths)

    @property
    def ready(self) -> bool:
        """True while at least one worker is alive with the model loaded."""
        return self._state.ready

    @property
    def reason(self) -> str | None:
        """Why the pool is not ready (the load error, a stop, a restart), else ``None``."""
        return None if self._state.ready else self._state.reason

    async def start(self) -> Declared | None:
        """Start the workers and wait until each has loaded the model or failed to.

        Returns the inputs and outputs the model's ``load`` declared in a worker, if it
        changed them (for the caller to serve as metadata), once at least one worker
        loaded; otherwise stops the pool and raises ``ModelNotReady`` carrying the load
        error. Cancelling ``start`` stops the pool.
        """
        state = self._state
        with state.lock:
            if state.phase != NEW:
                raise RuntimeError("a WorkerPool can be started only once")
            state.phase = STARTING
            state.reason = f"model {self._name!r} is loading"
            waiter = state.start_waiter = Waiter()
            state.open_wake_pipe()
        threading.Thread(
            target=self._supervisor.run, name=f"v2mount-pool-{self._name}", daemon=True
        ).start()
        try:
            await waiter.wait()
        except BaseException:
            await self.stop()
            raise
        if not state.start_ok:
            reason = state.reason
            await self.stop()
            raise ModelNotReady(reason)
        if state.declared is None:
            return None
        return Declared.from_wire(*state.declared)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer one request in a worker process.

        Raises ``Overloaded`` when ``max_queue_size`` requests already wait,
        ``ModelNotReady`` when no worker is alive, ``BrokenWorker`` when the worker died
        while running this request, ``InferenceTimeout`` when it was killed past
        ``hard_timeout``, ``ModelError`` (or the model's own ``V2MountError``) when
        predict raised. Cancellation withdraws a queued request; a running one finishes
        in its worker (the supervisor reads and drops its reply).
        """
        threshold = self._config.shm_threshold
        return await self._call(
            lambda seq, arena: encode_request(request, seq, arena, threshold), decode_reply
        )

    async def preprocess(self, request: InferenceRequest) -> Staged[InferenceRequest]:
        """Run the model's ``preprocess`` on one request in a worker; errors as ``infer``."""
        threshold = self._config.shm_threshold
        staged = await self._call(
            lambda seq, arena: encode_request(request, seq, arena, threshold, PREPROCESS),
            decode_stage_reply,
        )
        prepared, timings = staged
        assert isinstance(prepared, InferenceRequest)
        return prepared, timings

    async def postprocess(
        self, request: InferenceRequest, response: InferenceResponse
    ) -> Staged[InferenceResponse]:
        """Run the model's ``postprocess`` on one request's answer in a worker."""
        threshold = self._config.shm_threshold
        staged = await self._call(
            lambda seq, arena: encode_postprocess(request, response, seq, arena, threshold),
            decode_stage_reply,
        )
        return self._response(staged)

    async def infer_staged(self, request: InferenceRequest) -> Staged[InferenceResponse]:
        """preprocess → predict → postprocess on one request, in one trip to a worker."""
        threshold = self._config.shm_threshold
        staged = await self._call(
            lambda seq, arena: encode_request(request, seq, arena, threshold, PIPELINE),
            decode_stage_reply,
        )
        return self._response(staged)

    @staticmethod
    def _response(
        staged: Staged[InferenceRequest | InferenceResponse],
    ) -> Staged[InferenceResponse]:
        response, timings = staged
        assert isinstance(response, InferenceResponse)
        return response, timings

    async def _call(self, encode: Encode, decode: Decode[T]) -> T:
        """One frame to an idle worker and its reply's outcome (see ``infer``)."""
        while True:
            worker = await self._worker()
            try:
                return await self._exchange(worker, encode, decode)
            except _Lost:
                continue  # the worker died before it had the request: try another

    async def _worker(self) -> Worker:
        """A worker held for this task: an idle one, or the first one freed for its ticket."""
        got = self._state.acquire()
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
        state, seq = self._state, next(self._seq)
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
        state.release(worker, self._supervisor.policy.worn_out(worker))
        if updates:
            self._sink(updates)
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
                f"{where} ran this request for more than {self._config.hard_timeout} s "
                "and was killed"
            )
        if self._state.phase in (STOPPING, STOPPED):
            return BrokenWorker(f"{where} was stopped while running this request")
        return BrokenWorker(f"{where} {how} while running this request")

    async def stop(self) -> None:
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
                    state.reason = f"model {self._name!r} is stopped"
                if state.phase == STOPPED:
                    return
                state.stop_waiters.append(waiter)
                dropped = state.begin_stop()
            fire(dropped)
            await waiter.wait()

    def statistics(self) -> RunnerStatistics:
        return self._state.statistics()

    def pids(self) -> list[int]:
        """Process ids of the workers currently alive (loading or loaded)."""
        with self._state.lock:
            return [worker.pid for worker in self._state.workers.values()]
