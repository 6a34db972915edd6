"""``WorkerPool``: a model served by N worker processes, reached through anyio.

Callers (on any event loop: nothing is bound to one) put requests in the pool's queue,
withdraw them when cancelled, and wait on a ``Waiter`` of their own. The pool's monitor
thread (``_monitor.py``) does everything else.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Iterable

import anyio
import multiprocess

from v2mount.errors import ModelNotReady
from v2mount.model import Model
from v2mount.pool._ipc import request_to_wire, unlink_quietly
from v2mount.pool._monitor import Monitor
from v2mount.pool._state import NEW, STARTING, STOPPED, Job, PoolState, resolve
from v2mount.pool._waiter import Waiter
from v2mount.runner import MetricsSink, RunnerStatistics
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["WorkerPool"]


def _unlink_all(owner: int, paths: Iterable[str]) -> None:
    """At interpreter exit without ``stop``: remove whatever arenas are left.

    Not in a forked copy of the process, whose exit must not touch the owner's arenas.
    """
    if os.getpid() == owner:
        for path in list(paths):
            unlink_quietly(path)


class WorkerPool:
    """Runs a model in ``workers`` subprocesses (implements ``v2mount.runner.Runner``).

    The unloaded model is pickled with dill and loaded once in each worker. Requests
    wait in one bounded queue and go to an idle live worker; numpy buffers of at least
    ``shm_threshold`` bytes cross by shared memory. A dead worker is replaced at once;
    one busy with a request for more than ``hard_timeout`` seconds is killed first. A
    worker that answered ``max_requests_per_worker`` requests, or whose resident memory
    passed ``max_worker_memory_mb`` (Linux), is retired once idle and replaced.
    Each worker limits its native thread pools to ``threads_per_worker`` (``None``:
    leave them alone).

    All methods are called from an event loop (asyncio or trio); successive calls may
    come from different loops. ``metrics_sink`` is called from the pool's monitor
    thread, so it must be thread-safe.
    """

    def __init__(
        self,
        model: Model,
        workers: int,
        *,
        max_queue_size: int,
        metrics_sink: MetricsSink,
        shm_threshold: int = 64 * 1024,
        threads_per_worker: int | None = 1,
        hard_timeout: float | None = None,
        max_requests_per_worker: int | None = None,
        max_worker_memory_mb: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._name = model.settings.name
        self._state = PoolState(self._name, workers, max_queue_size)
        self._seq = itertools.count()
        arena_paths: set[str] = set()
        self._monitor = Monitor(
            self._state,
            model,
            context=multiprocess.get_context("spawn"),
            metrics_sink=metrics_sink,
            shm_threshold=shm_threshold,
            threads_per_worker=threads_per_worker,
            hard_timeout=hard_timeout,
            max_requests_per_worker=max_requests_per_worker,
            max_worker_memory_mb=max_worker_memory_mb,
            arena_paths=arena_paths,
        )
        # Tied to the monitor, which its thread keeps alive while any arena exists.
        weakref.finalize(self._monitor, _unlink_all, os.getpid(), arena_paths)

    @property
    def ready(self) -> bool:
        """True while at least one worker is alive with the model loaded."""
        return self._state.ready

    @property
    def reason(self) -> str | None:
        """Why the pool is not ready (the load error, a stop, a restart), else ``None``."""
        return None if self._state.ready else self._state.reason

    async def start(self) -> None:
        """Spawn the workers and wait until each has loaded the model or failed to.

        Returns once at least one worker loaded; otherwise stops the pool and raises
        ``ModelNotReady`` carrying the load error. Cancelling ``start`` stops the pool.
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
            target=self._monitor.run, name=f"v2mount-pool-{self._name}", daemon=True
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

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer one request in a worker process.

        Raises ``Overloaded`` when ``max_queue_size`` requests already wait,
        ``ModelNotReady`` when no worker is alive, ``BrokenWorker`` when the worker died
        while running this request, ``InferenceTimeout`` when it was killed past
        ``hard_timeout``, ``ModelError`` (or the model's own ``V2MountError``) when
        predict raised. Cancellation withdraws a queued request; a running one finishes
        in its worker and its result is dropped.
        """
        waiter = Waiter()
        job = Job(next(self._seq), request_to_wire(request), waiter)
        self._state.submit(job)
        try:
            await waiter.wait()
        except BaseException:
            self._state.abandon(job)
            raise
        outcome = job.outcome
        if isinstance(outcome, InferenceResponse):
            return outcome
        assert outcome is not None
        raise outcome

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
            resolve(dropped, ModelNotReady(f"model {self._name!r} is stopping"))
            await waiter.wait()

    def statistics(self) -> RunnerStatistics:
        return self._state.statistics()

    def pids(self) -> list[int]:
        """Process ids of the workers currently alive (loading or loaded)."""
        with self._state.lock:
            return [worker.pid for worker in self._state.workers.values()]
