"""The monitor: the one thread of a pool that owns its processes, pipes and arenas.

It spawns the workers, hands each queued request to an idle worker (a worker holds at
most one request, so an idle one is the least loaded), reads replies and worker output,
notices a death at once (pidfd, or the process sentinel) and replaces the dead, kills a
worker stuck past ``hard_timeout``, and runs the shutdown. Everything here runs in that
thread; it talks to callers only through ``PoolState`` and their waiters.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import selectors
import threading
import time
from typing import Any

from multiprocess.context import SpawnContext

from v2mount.errors import BadRequest, BrokenWorker, InferenceTimeout, ModelNotReady, V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._ipc import (
    Arena,
    arena_path,
    decode,
    encode,
    error_from_wire,
    response_from_wire,
    unlink_quietly,
)
from v2mount.pool._process import WorkerProcess
from v2mount.pool._shipping import ModelPackage, pack_model
from v2mount.pool._state import (
    DONE,
    QUEUED,
    RUNNING,
    SENT,
    STARTING,
    STOPPED,
    STOPPING,
    Job,
    PoolState,
    resolve,
)
from v2mount.pool._template import Template
from v2mount.pool._worker import WorkerSpec
from v2mount.runner import MetricsSink
from v2mount.settings import TensorSpec
from v2mount.types import InferenceResponse

__all__ = ["EXIT_GRACE", "STOP_GRACE", "Monitor"]

logger = logging.getLogger("v2mount.pool")
worker_logger = logging.getLogger("v2mount.worker")

#: How long a stop lets running requests finish, then how long workers get to exit.
STOP_GRACE = 5.0
EXIT_GRACE = 2.0
_MAX_BACKOFF = 60.0

_WAKE, _REPLY, _OUTPUT, _EXIT = range(4)


class Monitor:
    """Runs one pool's processes from its own thread (``run``)."""

    def __init__(
        self,
        state: PoolState,
        model: Model,
        *,
        context: SpawnContext,
        metrics_sink: MetricsSink,
        shm_threshold: int,
        threads_per_worker: int | None,
        hard_timeout: float | None,
        max_requests_per_worker: int | None,
        max_worker_memory_mb: float | None,
        arena_paths: set[str],
    ) -> None:
        self._state = state
        self._name = state.name
        #: The model's name as it may appear in a file name (arenas are named after it).
        self._file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", state.name)[:40]
        self._model = model
        self._context = context
        self._sink = metrics_sink
        self._shm_threshold = shm_threshold
        self._threads = threads_per_worker
        self._hard_timeout = hard_timeout
        self._max_requests = max_requests_per_worker
        self._max_memory = max_worker_memory_mb
        #: Arenas that exist now; the pool's finalizer removes them if the process exits.
        self._arena_paths = arena_paths
        self._selector: selectors.BaseSelector | None = None
        self._package: ModelPackage | None = None
        self._template: Template | None = None
        self._worker_ids = itertools.count(1)
        self._loading_initial: set[int] = set()
        self._respawns: list[float] = []
        self._load_failures = 0
        self._drain_deadline: float | None = None
        self._inputs_closed = False

    def run(self) -> None:
        """The thread's body; whatever happens, ``_finish`` leaves nothing behind."""
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._state.wake_read, selectors.EVENT_READ, (_WAKE, None))
        try:
            try:
                self._package = pack_model(self._model)
            except Exception as exc:
                with self._state.lock:
                    self._state.reason = (
                        f"model {self._name!r} cannot be sent to worker processes: {exc}"
                    )
            else:
                log = functools.partial(self._log, 0)
                self._template = Template(
                    self._context, self._package, self._threads, self._name, log
                )
                self._template.start()
                for _ in range(self._state.size):
                    self._spawn(initial=True)
            self._settle_start()
            while not (self._state.phase == STOPPING and not self._state.workers):
                for key, _ in selector.select(self._timeout()):
                    kind, worker = key.data
                    if kind == _WAKE:
                        self._on_wake()
                    elif not worker.disposed:
                        self._on_worker_event(kind, worker, key.fd)
                self._on_timers()
        except BaseException:
            logger.exception("the worker pool of model %r failed", self._name)
            with self._state.lock:
                self._state.reason = f"model {self._name!r}: its worker pool failed"
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

    def _spawn(self, *, initial: bool = False) -> WorkerProcess | None:
        assert self._template is not None and self._selector is not None
        worker_id = next(self._worker_ids)
        path = arena_path(f"v2mount-{os.getpid()}-{self._file_name}-{worker_id}")
        spec = WorkerSpec(
            worker_id=worker_id,
            parent_pid=os.getpid(),
            arena_path=path,
            shm_threshold=self._shm_threshold,
            threads=self._threads,
            log_level=worker_logger.getEffectiveLevel(),
        )
        if path is not None:
            self._arena_paths.add(path)
        try:
            worker = self._template.fork_worker(
                spec, f"v2mount-{self._name}-{worker_id}", functools.partial(self._log, worker_id)
            )
        except Exception as exc:
            if path is not None:
                self._arena_paths.discard(path)
            self._load_failed(f"model {self._name!r}: cannot start a worker process: {exc}")
            return None
        self._selector.register(worker.conn.fileno(), selectors.EVENT_READ, (_REPLY, worker))
        self._selector.register(worker.exit_fd, selectors.EVENT_READ, (_EXIT, worker))
        for fd in worker.output_fds:
            self._selector.register(fd, selectors.EVENT_READ, (_OUTPUT, worker))
        with self._state.lock:
            self._state.workers[worker_id] = worker
        if initial:
            self._loading_initial.add(worker_id)
        return worker

    def _on_wake(self) -> None:
        try:
            while os.read(self._state.wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        self._state.woken()
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers (each idle worker is a least-loaded one)."""
        while True:
            with self._state.lock:
                if not self._state.queue or not self._state.idle:
                    return
                job = self._state.queue.popleft()
                worker = self._state.idle.pop()
                job.state = SENT
                worker.job = job
                self._state.running += 1
            self._send(worker, job)

    def _send(self, worker: WorkerProcess, job: Job) -> None:
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
            with self._state.lock:
                worker.job = None
                self._state.running -= 1
                if job.state == SENT:
                    job.state = QUEUED
                    self._state.queue.appendleft(job)
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
            _, updates, declared, has_arena = message
            if has_arena and worker.arena_path is not None:
                worker.arena = Arena.attach(worker.arena_path)
                # Both ends hold it open now: without a name, no crash can leak it.
                unlink_quietly(worker.arena_path)
            self._apply_metrics(updates)
            if declared is not None and not self._state.start_ok:
                self._adopt(*declared)
            with self._state.lock:
                worker.loaded = True
                self._state.live += 1
                if not worker.retiring:
                    self._state.idle.append(worker)
                self._state.start_ok = True
            self._load_failures = 0
            self._loading_initial.discard(worker.id)
            predecessor, worker.predecessor = worker.predecessor, None
            if predecessor is not None and not predecessor.disposed:
                self._retire(predecessor)
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

    def _adopt(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Give the parent's model the inputs and outputs its ``load`` declared in a worker.

        Done once, before ``start`` returns, so readers of the settings see them settled.
        """
        settings = self._model.settings
        settings.inputs = [TensorSpec.model_validate(spec) for spec in inputs]
        settings.outputs = [TensorSpec.model_validate(spec) for spec in outputs]

    def _complete(self, worker: WorkerProcess, outcome: InferenceResponse | V2MountError) -> None:
        worker.served += 1
        recycle = None
        # While loads fail, a successor would not load either: keep the worn-out worker.
        if not worker.retiring and self._state.phase == RUNNING and not self._load_failures:
            recycle = self._worn_out(worker)
        with self._state.lock:
            job = worker.job
            worker.job = None
            self._state.running -= 1
            if not (worker.retiring or recycle):
                self._state.idle.append(worker)
            if job is not None and job.state == SENT:
                job.state = DONE
            else:
                job = None
        if recycle:
            self._recycle(worker, recycle)
        if job is not None:
            resolve([job], outcome)

    def _worn_out(self, worker: WorkerProcess) -> str | None:
        """Why a healthy worker should be replaced now (gunicorn's ``max_requests``)."""
        if self._max_requests is not None and worker.served >= self._max_requests:
            return f"served {worker.served} requests"
        if self._max_memory is not None:
            resident = worker.resident_mb()
            if resident is not None and resident > self._max_memory:
                return f"holds {resident:.0f} MB, more than {self._max_memory:g} MB"
        return None

    def _recycle(self, worker: WorkerProcess, why: str) -> None:
        """Take a worn-out worker out of service and start its successor.

        It stays alive (the model stays ready) until the successor has loaded, then it is
        retired; if the successor cannot load, it goes back to work.
        """
        where = f"worker {worker.id} of model {self._name!r} (pid {worker.pid})"
        logger.info("%s %s; replacing it", where, why)
        worker.recycled = why
        successor = self._spawn()
        if successor is None:
            self._reinstate(worker)
        else:
            successor.predecessor, worker.successor = worker, successor

    def _reinstate(self, worker: WorkerProcess) -> None:
        """Put a worker whose recycling failed back to work."""
        worker.recycled, worker.successor = None, None
        if not worker.disposed and not worker.retiring:
            with self._state.lock:
                self._state.idle.append(worker)
            self._dispatch()

    def _retire(self, worker: WorkerProcess) -> None:
        """Close the worker's pipe (it exits at EOF once idle); kill it if it lingers."""
        worker.retiring = True
        if not worker.conn.closed:
            self._unregister(worker.conn.fileno())
            worker.close_input()
        worker.exit_deadline = time.monotonic() + EXIT_GRACE

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
        stopping = self._state.phase == STOPPING
        with self._state.lock:
            self._state.workers.pop(worker.id, None)
            if worker in self._state.idle:
                self._state.idle.remove(worker)
            if worker.loaded:
                self._state.live -= 1
            job = worker.job
            worker.job = None
            if job is not None:
                self._state.running -= 1
                if job.state != SENT:
                    job = None
                else:
                    job.state = DONE
            if worker.loaded and self._state.live == 0 and not stopping:
                self._state.reason = (
                    f"model {self._name!r} has no live worker: worker {worker.id} {how}; "
                    "a replacement is starting"
                )
        worker.dispose()
        self._arena_paths.discard(worker.arena_path or "")
        if job is not None:
            resolve([job], self._broken(worker, how, stopping))
        if worker.predecessor is not None:  # a successor that did not load
            self._reinstate(worker.predecessor)
            worker.predecessor = None
        # A recycled worker's successor is already there: only replace what is missing.
        missing = self._state.size - len(self._state.workers) - len(self._respawns)
        exiting = not threading.main_thread().is_alive()  # the interpreter, that is
        replace = missing > 0 and self._state.phase == RUNNING and not exiting
        if worker.loaded:
            # The model loads fine: whatever ended this worker, replace it at once.
            if replace:
                self._respawns.append(time.monotonic())
            if not (stopping or exiting or worker.recycled):
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
            if replace:
                self._respawns.append(time.monotonic() + self._backoff())
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
        with self._state.lock:
            if self._state.live == 0:
                self._state.reason = reason

    def _settle_start(self) -> None:
        """Once every initial worker loaded or failed, let ``start`` return."""
        if self._loading_initial:
            return
        with self._state.lock:
            if self._state.phase != STARTING:
                return
            if self._state.start_ok:
                self._state.phase = RUNNING
                dropped: list[Job] = []
            else:
                dropped = self._state.begin_stop(self._state.reason)
            waiter, self._state.start_waiter = self._state.start_waiter, None
        resolve(dropped, ModelNotReady(self._state.reason))
        if waiter is not None:
            waiter.fire()

    def _timeout(self) -> float | None:
        deadlines = list(self._respawns)
        if self._hard_timeout is not None:
            deadlines += [
                w.started + self._hard_timeout
                for w in self._state.workers.values()
                if w.job is not None and not w.timed_out
            ]
        deadlines += [
            w.exit_deadline for w in self._state.workers.values() if w.exit_deadline is not None
        ]
        if self._state.phase == STOPPING:
            deadlines.append(0.0 if self._drain_deadline is None else self._drain_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self._hard_timeout is not None:
            for worker in list(self._state.workers.values()):
                if (
                    worker.job is not None
                    and not worker.timed_out
                    and now - worker.started >= self._hard_timeout
                ):
                    worker.timed_out = worker.retiring = True
                    worker.kill()
        for worker in list(self._state.workers.values()):
            if worker.exit_deadline is not None and now >= worker.exit_deadline:
                worker.kill()
        if self._state.phase == RUNNING:
            self._replace_missing(now)
        elif self._state.phase == STOPPING:
            self._advance_stop(now)

    def _backoff(self) -> float:
        """How long a worker that failed to load (or to start) waits to be replaced."""
        if not self._load_failures:
            return 0.0
        return float(min(_MAX_BACKOFF, 0.5 * 2 ** (self._load_failures - 1)))

    def _replace_missing(self, now: float) -> None:
        """Keep ``workers`` processes: spawn those due, schedule those not yet scheduled.

        ``_on_exit`` schedules a worker that had loaded for now and one that failed to
        load after the backoff; slots left empty otherwise (failed at start, or the
        process could not be started) count as load failures too.
        """
        if not threading.main_thread().is_alive():
            return  # the interpreter is exiting
        due = sum(1 for t in self._respawns if t <= now)
        self._respawns = [t for t in self._respawns if t > now]
        for _ in range(due):
            self._spawn()
        missing = self._state.size - len(self._state.workers) - len(self._respawns)
        self._respawns += [now + self._backoff()] * missing
        if not self._state.workers:
            # No worker is even loading: nothing will serve the queue for a while.
            with self._state.lock:
                dropped = self._state.take_queue()
            resolve(dropped, ModelNotReady(self._state.reason))

    def _advance_stop(self, now: float) -> None:
        """Let running requests finish (up to ``STOP_GRACE``), then retire every worker."""
        self._respawns = []
        if self._drain_deadline is None:
            self._drain_deadline = now + STOP_GRACE
        if self._inputs_closed or (self._state.running and now < self._drain_deadline):
            return
        for worker in list(self._state.workers.values()):
            if worker.exit_deadline is None:
                self._retire(worker)
        self._inputs_closed = True

    def _finish(self) -> None:
        """Last act of the monitor: no process, arena, fd or waiting task is left behind."""
        for worker in list(self._state.workers.values()):
            worker.kill()
        for worker in list(self._state.workers.values()):
            worker.reap(EXIT_GRACE)
            worker.dispose()
            self._arena_paths.discard(worker.arena_path or "")
        if self._template is not None:
            self._template.stop()
        with self._state.lock:
            running = [w.job for w in self._state.workers.values() if w.job and w.job.state == SENT]
            self._state.workers.clear()
            self._state.idle.clear()
            self._state.live = self._state.running = 0
            self._state.phase = STOPPED
            if self._state.start_ok:
                self._state.reason = f"model {self._name!r} is stopped"
            waiters = self._state.stop_waiters
            self._state.stop_waiters = []
            if self._state.start_waiter is not None:
                waiters.append(self._state.start_waiter)
                self._state.start_waiter = None
            self._state.close_wake_pipe()
            for job in running:
                job.state = DONE
            queued = self._state.take_queue()
        if self._selector is not None:
            self._selector.close()
        resolve(running, BrokenWorker(f"model {self._name!r} was stopped"))
        resolve(queued, ModelNotReady(f"model {self._name!r} is stopped"))
        for waiter in waiters:
            waiter.fire()
