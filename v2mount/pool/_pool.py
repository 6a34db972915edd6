"""``WorkerPool``: a model served by N worker processes, reached through anyio.

Two threads touch a pool. The event loop's (any loop's: nothing is bound to one) submits
requests into a central queue and withdraws them when cancelled. The pool's *monitor*
thread owns every process, pipe and arena: it spawns workers, hands the next queued
request to whichever worker is idle (a worker holds at most one request, so an idle one
is the least loaded), reads replies and worker output, notices deaths at once (pidfd or
process sentinel) and replaces the dead, kills workers stuck past ``hard_timeout`` and
runs the shutdown. It wakes each waiting task through that task's own loop token.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import selectors
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import anyio
import multiprocess

from v2mount.errors import (
    BadRequest,
    BrokenWorker,
    InferenceTimeout,
    ModelNotReady,
    Overloaded,
    V2MountError,
)
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._ipc import (
    Arena,
    RequestWire,
    decode,
    encode,
    error_from_wire,
    request_to_wire,
    response_from_wire,
    unlink_quietly,
)
from v2mount.pool._process import WorkerProcess
from v2mount.pool._shipping import ModelPackage, pack_model
from v2mount.pool._waiter import Waiter
from v2mount.pool._worker import WorkerSpec
from v2mount.runner import MetricsSink, RunnerStatistics
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["WorkerPool"]

logger = logging.getLogger("v2mount.pool")
worker_logger = logging.getLogger("v2mount.worker")

#: How long ``stop`` lets running requests finish, then how long workers get to exit.
STOP_GRACE = 5.0
EXIT_GRACE = 2.0
_MAX_BACKOFF = 60.0

_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = range(5)
_QUEUED, _SENT, _DONE, _ABANDONED = range(4)
_WAKE, _REPLY, _OUTPUT, _EXIT = range(4)


class _Job:
    """One request's way through the pool; ``state`` changes under the pool's lock."""

    __slots__ = ("outcome", "seq", "state", "waiter", "wire")

    def __init__(self, seq: int, wire: RequestWire | None, waiter: Waiter) -> None:
        self.seq = seq
        self.wire = wire
        self.waiter = waiter
        self.state = _QUEUED
        self.outcome: InferenceResponse | V2MountError | None = None


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
    wait in one bounded queue and go to an idle live worker. All methods are called from
    an event loop (asyncio or trio); successive calls may come from different loops.
    ``metrics_sink`` is called from the pool's monitor thread, so it must be thread-safe.
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
    ) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._model = model
        self._name = model.settings.name
        self._size = workers
        self._max_queue_size = max_queue_size
        self._sink = metrics_sink
        self._shm_threshold = shm_threshold
        self._threads = threads_per_worker
        self._hard_timeout = hard_timeout
        self._context = multiprocess.get_context("spawn")

        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._idle: list[WorkerProcess] = []
        self._workers: dict[int, WorkerProcess] = {}
        self._live = 0
        self._running = 0
        self._phase = _NEW
        self._reason = f"model {self._name!r} is not started"
        self._start_ok = False
        self._start_waiter: Waiter | None = None
        self._stop_waiters: list[Waiter] = []
        self._wake_read = self._wake_write = -1
        self._wake_pending = False
        self._seq = itertools.count()
        self._arena_paths: set[str] = set()
        weakref.finalize(self, _unlink_all, os.getpid(), self._arena_paths)

        # Owned by the monitor thread.
        self._selector: selectors.BaseSelector | None = None
        self._package: ModelPackage | None = None
        self._worker_ids = itertools.count(1)
        self._loading_initial: set[int] = set()
        self._respawns: list[float] = []
        self._load_failures = 0
        self._drain_deadline: float | None = None
        self._kill_deadline: float | None = None

    # -- called from the event loop ---------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while at least one worker is alive with the model loaded."""
        return self._live > 0 and self._phase in (_STARTING, _RUNNING)

    @property
    def reason(self) -> str | None:
        """Why the pool is not ready (the load error, a stop, a restart), else ``None``."""
        return None if self.ready else self._reason

    async def start(self) -> None:
        """Spawn the workers and wait until each has loaded the model or failed to.

        Returns once at least one worker loaded; otherwise stops the pool and raises
        ``ModelNotReady`` carrying the load error. Cancelling ``start`` stops the pool.
        """
        with self._lock:
            if self._phase != _NEW:
                raise RuntimeError("a WorkerPool can be started only once")
            self._phase = _STARTING
            self._reason = f"model {self._name!r} is loading"
            waiter = self._start_waiter = Waiter()
            self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        threading.Thread(
            target=self._monitor, name=f"v2mount-pool-{self._name}", daemon=True
        ).start()
        try:
            await waiter.wait()
        except BaseException:
            await self.stop()
            raise
        if not self._start_ok:
            reason = self._reason
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
        job = _Job(next(self._seq), request_to_wire(request), waiter)
        self._submit(job)
        try:
            await waiter.wait()
        except BaseException:
            self._abandon(job)
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
        with anyio.CancelScope(shield=True):
            waiter = Waiter()
            with self._lock:
                if self._phase == _NEW:
                    self._phase = _STOPPED
                    self._reason = f"model {self._name!r} is stopped"
                if self._phase == _STOPPED:
                    return
                self._stop_waiters.append(waiter)
                dropped = self._begin_stop()
            self._resolve(dropped, ModelNotReady(f"model {self._name!r} is stopping"))
            await waiter.wait()

    def statistics(self) -> RunnerStatistics:
        with self._lock:
            return RunnerStatistics(
                workers=self._size,
                live_workers=self._live,
                queued=max(0, len(self._queue) - len(self._idle)),
                in_flight=len(self._queue) + self._running,
                max_queue_size=self._max_queue_size,
            )

    def pids(self) -> list[int]:
        """Process ids of the workers currently alive (loading or loaded)."""
        with self._lock:
            return [worker.pid for worker in self._workers.values()]

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._phase not in (_STARTING, _RUNNING) or self._live == 0:
                raise ModelNotReady(self._reason)
            waiting = len(self._queue) - len(self._idle)
            if waiting >= self._max_queue_size:
                raise Overloaded(
                    f"model {self._name!r} has {waiting} requests waiting for a worker"
                )
            self._queue.append(job)
            if self._idle:
                self._wake()

    def _abandon(self, job: _Job) -> None:
        with self._lock:
            if job.state == _QUEUED:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.state = _ABANDONED
            elif job.state == _SENT:
                job.state = _ABANDONED

    # -- shared helpers (the caller holds the lock where noted) -----------------------

    def _wake(self) -> None:
        """Wake the monitor thread (lock held; the pipe is closed under the same lock)."""
        if not self._wake_pending and self._wake_write >= 0:
            self._wake_pending = True
            try:
                os.write(self._wake_write, b"\0")
            except BlockingIOError:
                pass

    def _begin_stop(self, reason: str | None = None) -> list[_Job]:
        """Enter the stopping phase (lock held); returns the queued jobs to fail."""
        if self._phase == _STOPPING:
            return []
        self._phase = _STOPPING
        self._reason = reason or f"model {self._name!r} is stopping"
        dropped = list(self._queue)
        self._queue.clear()
        for job in dropped:
            job.state = _DONE
        self._wake()
        return dropped

    @staticmethod
    def _resolve(jobs: Iterable[_Job], outcome: InferenceResponse | V2MountError) -> None:
        for job in jobs:
            job.outcome = outcome
            job.waiter.fire()

    # -- the monitor thread -----------------------------------------------------------

    def _monitor(self) -> None:
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ, (_WAKE, None))
        try:
            try:
                self._package = pack_model(self._model)
            except Exception as exc:
                with self._lock:
                    self._reason = f"model {self._name!r} cannot be sent to worker processes: {exc}"
            else:
                for _ in range(self._size):
                    self._spawn(initial=True)
            self._settle_start()
            while not (self._phase == _STOPPING and not self._workers):
                for key, _ in selector.select(self._timeout()):
                    kind, worker = key.data
                    if kind == _WAKE:
                        self._on_wake()
                    elif not worker.disposed:
                        self._on_worker_event(kind, worker, key.fd)
                self._on_timers()
        except BaseException:
            logger.exception("the worker pool of model %r failed", self._name)
            with self._lock:
                self._reason = f"model {self._name!r}: its worker pool failed"
        finally:
            self._finish()

    def _on_worker_event(self, kind: int, worker: WorkerProcess, fd: int) -> None:
        try:
            if kind == _REPLY:
                self._on_reply(worker)
            elif kind == _OUTPUT:
                if not worker.read_output(fd):
                    self._unregister(fd)
            else:
                self._on_exit(worker)
        except Exception:
            logger.exception(
                "model %r: talking to worker %d failed; killing it", self._name, worker.id
            )
            worker.retiring = True
            worker.kill()

    def _unregister(self, fd: int) -> None:
        assert self._selector is not None
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _log(self, worker_id: int, level: int, text: str) -> None:
        worker_logger.log(
            level,
            "[model %s, worker %d] %s",
            self._name,
            worker_id,
            text,
            extra={"model_name": self._name, "worker_id": worker_id},
        )

    def _apply_metrics(self, updates: list[MetricUpdate]) -> None:
        if updates:
            try:
                self._sink(updates)
            except Exception:
                logger.exception("model %r: the metrics sink raised", self._name)

    def _spawn(self, *, initial: bool = False) -> None:
        assert self._package is not None and self._selector is not None
        worker_id = next(self._worker_ids)
        arena = Arena.create(f"v2mount-{os.getpid()}-{worker_id}")
        spec = WorkerSpec(
            worker_id=worker_id,
            parent_pid=os.getpid(),
            arena_path=arena.path if arena is not None else None,
            shm_threshold=self._shm_threshold,
            threads=self._threads,
            log_level=worker_logger.getEffectiveLevel(),
        )
        if arena is not None:
            self._arena_paths.add(arena.path)
        try:
            worker = WorkerProcess(
                self._context,
                spec,
                arena,
                self._package,
                f"v2mount-{self._name}-{worker_id}",
                functools.partial(self._log, worker_id),
            )
        except Exception as exc:
            if arena is not None:
                arena.close()
                arena.unlink()
                self._arena_paths.discard(arena.path)
            self._load_failed(f"model {self._name!r}: cannot start a worker process: {exc}")
            return
        self._selector.register(worker.conn.fileno(), selectors.EVENT_READ, (_REPLY, worker))
        self._selector.register(worker.exit_fd, selectors.EVENT_READ, (_EXIT, worker))
        for fd in worker.output_fds:
            self._selector.register(fd, selectors.EVENT_READ, (_OUTPUT, worker))
        with self._lock:
            self._workers[worker_id] = worker
        if initial:
            self._loading_initial.add(worker_id)

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            self._wake_pending = False
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers (each idle worker is a least-loaded one)."""
        while True:
            with self._lock:
                if not self._queue or not self._idle:
                    return
                job = self._queue.popleft()
                worker = self._idle.pop()
                job.state = _SENT
                worker.job = job
                self._running += 1
            self._send(worker, job)

    def _send(self, worker: WorkerProcess, job: _Job) -> None:
        try:
            frame = encode((job.seq, job.wire), worker.arena, self._shm_threshold)
        except Exception as exc:
            self._complete(worker, BadRequest(f"the request cannot be sent to a worker: {exc}"))
            return
        worker.started = time.monotonic()
        try:
            worker.conn.send_bytes(frame)
        except OSError:
            # The request never reached the worker, so it is safe to give to another one.
            with self._lock:
                worker.job = None
                self._running -= 1
                if job.state == _SENT:
                    job.state = _QUEUED
                    self._queue.appendleft(job)
            worker.retiring = True
            worker.kill()
            return
        job.wire = None

    def _on_reply(self, worker: WorkerProcess) -> bool:
        """Handle one message of the worker; ``False`` at EOF (its exit fd will fire)."""
        try:
            frame = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._unregister(worker.conn.fileno())
            return False
        message: tuple[Any, ...] = decode(frame, worker.arena)
        kind = message[0]
        if kind == "log":
            _, level, name, text = message
            self._log(worker.id, level, f"{name}: {text}")
        elif kind == "ready":
            self._apply_metrics(message[1])
            with self._lock:
                worker.loaded = True
                self._live += 1
                if not worker.retiring:
                    self._idle.append(worker)
                self._start_ok = True
            self._load_failures = 0
            self._loading_initial.discard(worker.id)
            self._settle_start()
            self._dispatch()
        elif kind == "load_failed":
            _, text, updates = message
            self._apply_metrics(updates)
            worker.load_error = f"model {self._name!r} failed to load: {text}"
        else:
            _, seq, payload, updates = message
            if worker.job is None or worker.job.seq != seq:
                raise RuntimeError(f"reply to request {seq}, which this worker does not hold")
            outcome = response_from_wire(payload) if kind == "result" else error_from_wire(payload)
            self._apply_metrics(updates)
            self._complete(worker, outcome)
            self._dispatch()
        return True

    def _complete(self, worker: WorkerProcess, outcome: InferenceResponse | V2MountError) -> None:
        with self._lock:
            job = worker.job
            worker.job = None
            self._running -= 1
            if not worker.retiring:
                self._idle.append(worker)
            if job is None or job.state != _SENT:
                return
            job.state = _DONE
        self._resolve([job], outcome)

    def _on_exit(self, worker: WorkerProcess) -> None:
        # The worker's last words first: messages still in the pipe, then its output.
        worker.retiring = True
        try:
            while not worker.conn.closed and worker.conn.poll(0) and self._on_reply(worker):
                pass
        except Exception:
            logger.exception("model %r: reading worker %d's last messages", self._name, worker.id)
        for fd in worker.output_fds:
            worker.read_output(fd)
            self._unregister(fd)
        if not worker.conn.closed:
            self._unregister(worker.conn.fileno())
        self._unregister(worker.exit_fd)
        worker.reap(EXIT_GRACE)
        how = worker.describe_exit()
        stopping = self._phase == _STOPPING
        with self._lock:
            self._workers.pop(worker.id, None)
            if worker in self._idle:
                self._idle.remove(worker)
            if worker.loaded:
                self._live -= 1
            job = worker.job
            worker.job = None
            if job is not None:
                self._running -= 1
                if job.state != _SENT:
                    job = None
                else:
                    job.state = _DONE
            if worker.loaded and self._live == 0 and not stopping:
                self._reason = (
                    f"model {self._name!r} has no live worker: worker {worker.id} {how}; "
                    "a replacement is starting"
                )
        if worker.arena is not None:
            self._arena_paths.discard(worker.arena.path)
        worker.dispose()
        if job is not None:
            self._resolve([job], self._broken(worker, how, stopping))
        if worker.loaded:
            if not stopping and threading.main_thread().is_alive():
                logger.warning(
                    "worker %d of model %r (pid %d) %s; replacing it",
                    worker.id,
                    self._name,
                    worker.pid,
                    how,
                )
        else:
            reason = worker.load_error
            if reason is None:
                reason = f"model {self._name!r} failed to load: its worker process {how}"
            self._load_failed(reason)
        self._loading_initial.discard(worker.id)
        self._settle_start()

    def _broken(self, worker: WorkerProcess, how: str, stopping: bool) -> V2MountError:
        where = f"worker {worker.id} of model {self._name!r} (pid {worker.pid})"
        if worker.timed_out:
            return InferenceTimeout(
                f"{where} ran this request for more than {self._hard_timeout} s and was killed"
            )
        if stopping:
            return BrokenWorker(f"{where} was stopped while running this request")
        return BrokenWorker(f"{where} {how} while running this request")

    def _load_failed(self, reason: str) -> None:
        logger.warning("%s", reason)
        self._load_failures += 1
        with self._lock:
            if self._live == 0:
                self._reason = reason

    def _settle_start(self) -> None:
        """Once every initial worker loaded or failed, let ``start`` return."""
        if self._loading_initial:
            return
        with self._lock:
            if self._phase != _STARTING:
                return
            if self._start_ok:
                self._phase = _RUNNING
                dropped: list[_Job] = []
            else:
                dropped = self._begin_stop(self._reason)
            waiter, self._start_waiter = self._start_waiter, None
        self._resolve(dropped, ModelNotReady(self._reason))
        if waiter is not None:
            waiter.fire()

    def _timeout(self) -> float | None:
        deadlines = list(self._respawns)
        if self._hard_timeout is not None:
            deadlines += [
                w.started + self._hard_timeout
                for w in self._workers.values()
                if w.job is not None and not w.timed_out
            ]
        if self._phase == _STOPPING:
            deadlines += [d for d in (self._drain_deadline, self._kill_deadline) if d is not None]
            if self._drain_deadline is None:
                deadlines.append(0.0)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self._hard_timeout is not None:
            for worker in list(self._workers.values()):
                if (
                    worker.job is not None
                    and not worker.timed_out
                    and now - worker.started >= self._hard_timeout
                ):
                    worker.timed_out = worker.retiring = True
                    worker.kill()
        if self._phase == _RUNNING:
            self._replace_missing(now)
        elif self._phase == _STOPPING:
            self._advance_stop(now)

    def _replace_missing(self, now: float) -> None:
        """Keep ``workers`` processes: respawn at once, or with backoff after load failures."""
        if not threading.main_thread().is_alive():
            return  # the interpreter is exiting
        missing = self._size - len(self._workers) - len(self._respawns)
        if missing > 0:
            delay = 0.0
            if self._load_failures:
                delay = min(_MAX_BACKOFF, 0.5 * 2 ** (self._load_failures - 1))
            self._respawns += [now + delay] * missing
        due = sum(1 for t in self._respawns if t <= now)
        self._respawns = [t for t in self._respawns if t > now]
        for _ in range(due):
            self._spawn()
        if not self._workers:
            # No worker is even loading: nothing will serve the queue for a while.
            with self._lock:
                dropped = list(self._queue)
                self._queue.clear()
                for job in dropped:
                    job.state = _DONE
            self._resolve(dropped, ModelNotReady(self._reason))

    def _advance_stop(self, now: float) -> None:
        self._respawns = []
        if self._drain_deadline is None:
            self._drain_deadline = now + STOP_GRACE
        if self._kill_deadline is None:
            if self._running and now < self._drain_deadline:
                return
            for worker in self._workers.values():
                if not worker.conn.closed:
                    self._unregister(worker.conn.fileno())
                    worker.close_input()
            self._kill_deadline = now + EXIT_GRACE
        elif now >= self._kill_deadline:
            for worker in self._workers.values():
                worker.kill()

    def _finish(self) -> None:
        """Last act of the monitor: no process, arena, fd or waiting task is left behind."""
        for worker in list(self._workers.values()):
            worker.kill()
        for worker in list(self._workers.values()):
            worker.reap(EXIT_GRACE)
            if worker.arena is not None:
                self._arena_paths.discard(worker.arena.path)
            worker.dispose()
        with self._lock:
            running = [w.job for w in self._workers.values() if w.job is not None]
            queued = list(self._queue)
            self._queue.clear()
            self._workers.clear()
            self._idle.clear()
            self._live = self._running = 0
            self._phase = _STOPPED
            if self._start_ok:
                self._reason = f"model {self._name!r} is stopped"
            waiters = self._stop_waiters
            self._stop_waiters = []
            if self._start_waiter is not None:
                waiters.append(self._start_waiter)
                self._start_waiter = None
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1
            for job in running + queued:
                job.state = _DONE
        if self._selector is not None:
            self._selector.close()
        self._resolve(running, BrokenWorker(f"model {self._name!r} was stopped"))
        self._resolve(queued, ModelNotReady(f"model {self._name!r} is stopped"))
        for waiter in waiters:
            waiter.fire()
