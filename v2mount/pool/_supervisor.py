"""The supervisor: the one thread of a pool that owns its processes' lives.

It starts the workers, reads their control pipes (``Ready``, ``LoadFailed``, ``Log``)
and their output, notices a death at once (pidfd, or the process sentinel) and replaces
the dead, kills a worker stuck past ``hard_timeout``, finishes the exchange of a request
whose task was cancelled, recycles worn-out workers, and runs the shutdown. It is never
on the request path: request tasks write requests and read replies themselves
(``_pool.py``). It talks to them only through ``PoolState`` and their waiters; what to do
about a worker is ``Policy``'s call (``_lifecycle.py``).
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

from multiprocess.context import SpawnContext

from v2mount.errors import ModelNotReady
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._arena import Arena, arena_path, unlink_quietly
from v2mount.pool._ipc import DeclaredSpecs, LoadFailed, Log, Ready, updates_of
from v2mount.pool._lifecycle import Phase, Policy
from v2mount.pool._process import WorkerProcess
from v2mount.pool._shipping import ModelPackage, pack_model
from v2mount.pool._state import RUNNING, STARTING, STOPPED, STOPPING, PoolState, Worker, fire
from v2mount.pool._template import Template
from v2mount.pool._waiter import Waiter
from v2mount.pool._worker import WorkerSpec
from v2mount.runner import MetricsSink, apply_metrics

__all__ = ["EXIT_GRACE", "STOP_GRACE", "Supervisor"]

logger = logging.getLogger("v2mount.pool")
worker_logger = logging.getLogger("v2mount.worker")

#: How long a stop lets running requests finish, then how long workers get to exit.
STOP_GRACE = 5.0
EXIT_GRACE = 2.0

_WAKE, _EVENTS, _OUTPUT, _EXIT, _DRAIN = range(5)


class Supervisor:
    """Runs one pool's processes from its own thread (``run``)."""

    def __init__(
        self,
        state: PoolState,
        model: Model,
        *,
        context: SpawnContext,
        metrics_sink: MetricsSink,
        arena_paths: set[str],
    ) -> None:
        self._state = state
        self._config = state.config
        self._name = state.name
        #: The model's name as it may appear in a file name (arenas are named after it).
        self._file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", state.name)[:40]
        self._model = model
        self._context = context
        self._sink = metrics_sink
        self.policy = Policy(
            self._config.max_requests_per_worker, self._config.max_worker_memory_mb
        )
        #: Arenas that exist now; the pool's finalizer removes them if the process exits.
        self._arena_paths = arena_paths
        self._selector = selectors.DefaultSelector()
        self._package: ModelPackage | None = None
        self._template: Template | None = None
        self._worker_ids = itertools.count(1)
        self._loading_initial: set[int] = set()
        # Sibling workers fail to load the same way: one traceback and one warning for a
        # run of failures, until a worker loads again.
        self._failing = self._warned = False
        self._respawns: list[float] = []
        self._drain_deadline: float | None = None

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """The thread's body; whatever happens, ``_finish`` leaves nothing behind."""
        selector = self._selector
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
                threads = self._config.threads_per_worker
                self._template = Template(self._context, self._package, threads, self._name, log)
                self._template.start()
                for _ in range(self._config.workers):
                    self._spawn(initial=True)
            self._settle_start()
            while not (self._state.phase == STOPPING and not self._state.workers):
                for key, events in selector.select(self._timeout()):
                    kind, worker = key.data
                    if kind == _WAKE:
                        self._on_wake()
                    elif worker.phase is not Phase.DEAD:
                        self._on_worker_event(kind, worker, key.fd, events)
                self._on_timers()
        except BaseException:
            logger.exception("the worker pool of model %r failed", self._name)
            with self._state.lock:
                self._state.reason = f"model {self._name!r}: its worker pool failed"
        finally:
            self._finish()

    def _on_worker_event(self, kind: int, worker: Worker, fd: int, events: int) -> None:
        try:
            if kind == _EVENTS:
                self._on_message(worker)
            elif kind == _OUTPUT:
                if not worker.process.read_output(fd):
                    self._unregister(fd)
            elif kind == _DRAIN:
                self._drain(worker)
            else:
                self._on_exit(worker)
        except Exception:
            logger.exception(
                "model %r: talking to worker %d failed; killing it", self._name, worker.id
            )
            worker.process.kill()

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _on_wake(self) -> None:
        try:
            while os.read(self._state.wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        with self._state.lock:
            handed_back, self._state.handed_back = self._state.handed_back, []
        for worker in handed_back:
            self._take_back(worker)

    def _take_back(self, worker: Worker) -> None:
        """A worker a request task let go of, for the supervisor to act on."""
        phase = worker.phase
        if phase is Phase.DRAINING:
            self._drain(worker)
        elif phase is Phase.WORN:
            self._recycle(worker)
        elif phase is Phase.DEAD:
            if not worker.held:
                self._dispose(worker)
        elif phase is Phase.RETIRING:
            self._retire(worker)
        elif phase is Phase.IDLE and self._state.phase == STOPPING:
            self._retire(worker)

    # -- workers' messages -----------------------------------------------------------------

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
        apply_metrics(self._sink, updates, self._name, logger)

    def _on_message(self, worker: Worker) -> bool:
        """Handle one control message; ``False`` at EOF (its exit fd will fire)."""
        events = worker.process.events
        try:
            message = events.recv()
        except (EOFError, OSError):
            self._unregister(events.fileno())
            return False
        if isinstance(message, Log):
            self._log(worker.id, message.level, f"{message.name}: {message.text}")
        elif isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, LoadFailed):
            self._apply_metrics(message.updates)
            worker.load_error = f"model {self._name!r} failed to load: {message.text}"
            if message.traceback and not self._failing:
                text = f"loading the model failed\n{message.traceback.rstrip()}"
                self._log(worker.id, logging.ERROR, text)
                self._failing = True
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")
        return True

    def _on_ready(self, worker: Worker, ready: Ready) -> None:
        self._failing = self._warned = False
        process = worker.process
        if ready.has_arena and process.arena_path is not None:
            process.arena = Arena.attach(process.arena_path)
            # Both ends hold it open now: without a name, no crash can leak it.
            unlink_quietly(process.arena_path)
        self._apply_metrics(ready.updates)
        self.policy.loaded()
        self._loading_initial.discard(worker.id)
        worker.loaded = True
        woken: Waiter | None = None
        with self._state.lock:
            if ready.declared is not None and self._state.declared is None:
                self._state.declared = DeclaredSpecs(*ready.declared)
            self._state.start_ok = True
            if worker.phase is Phase.LOADING:
                woken = self._state.offer(worker)
        if woken is not None:
            woken.fire()
        predecessor, worker.predecessor = worker.predecessor, None
        if predecessor is not None and predecessor.phase is Phase.WORN:
            self._retire(predecessor)
        if worker.phase is Phase.IDLE and self._state.phase == STOPPING:
            self._retire(worker)
        self._settle_start()

    # -- starting, retiring and disposing of workers -----------------------------------------

    def _new_process(self, spec: WorkerSpec) -> WorkerProcess:
        """The one place a worker process is started."""
        assert self._template is not None
        return self._template.fork_worker(
            spec,
            f"v2mount-{self._name}-{spec.worker_id}",
            functools.partial(self._log, spec.worker_id),
        )

    def _spawn(self, *, initial: bool = False) -> Worker | None:
        worker_id = next(self._worker_ids)
        path = arena_path(f"v2mount-{os.getpid()}-{self._file_name}-{worker_id}")
        spec = WorkerSpec(
            worker_id=worker_id,
            parent_pid=os.getpid(),
            arena_path=path,
            shm_threshold=self._config.shm_threshold,
            threads=self._config.threads_per_worker,
            log_level=worker_logger.getEffectiveLevel(),
        )
        if path is not None:
            self._arena_paths.add(path)
        try:
            process = self._new_process(spec)
        except Exception as exc:
            if path is not None:
                self._arena_paths.discard(path)
            self._load_failed(f"model {self._name!r}: cannot start a worker process: {exc}")
            return None
        worker = Worker(process, self._name)
        register = self._selector.register
        register(process.events.fileno(), selectors.EVENT_READ, (_EVENTS, worker))
        register(process.exit_fd, selectors.EVENT_READ, (_EXIT, worker))
        for fd in process.output_fds:
            register(fd, selectors.EVENT_READ, (_OUTPUT, worker))
        with self._state.lock:
            self._state.workers[worker_id] = worker
        if initial:
            self._loading_initial.add(worker_id)
        return worker

    def _retire(self, worker: Worker) -> None:
        """End its request channel (it exits at EOF once idle); kill it if it lingers."""
        with self._state.lock:
            if worker.phase is Phase.DEAD:
                return
            self._state.set_phase(worker, Phase.RETIRING)
        self._unregister(worker.channel.fd)
        worker.process.close_input()
        if worker.retire_at is None:
            worker.retire_at = time.monotonic() + EXIT_GRACE

    def _dispose(self, worker: Worker) -> None:
        if not worker.disposed:
            self._unregister(worker.channel.fd)
            worker.dispose()
            self._arena_paths.discard(worker.process.arena_path or "")

    # -- draining the exchange of a cancelled request ------------------------------------------

    def _drain(self, worker: Worker) -> None:
        """Finish writing the request and read its reply, then put the worker back to work."""
        channel = worker.channel
        try:
            if channel.writing and not channel.write_some():
                self._watch_channel(worker, selectors.EVENT_WRITE)
                return
            frame = channel.read_some()
        except (EOFError, OSError):
            self._unregister(channel.fd)  # it is dying: its exit fd fires
            return
        if frame is None:
            self._watch_channel(worker, selectors.EVENT_READ)
            return
        self._unregister(channel.fd)
        self._apply_metrics(updates_of(frame))
        del frame
        with self._state.lock:
            worker.busy_since = 0.0
            worker.served += 1
            woken = self._state.offer(worker) if worker.phase is Phase.DRAINING else None
        if woken is not None:
            woken.fire()
        elif worker.phase is Phase.IDLE and self._state.phase == STOPPING:
            self._retire(worker)

    def _watch_channel(self, worker: Worker, events: int) -> None:
        try:
            self._selector.modify(worker.channel.fd, events, (_DRAIN, worker))
        except KeyError:
            self._selector.register(worker.channel.fd, events, (_DRAIN, worker))

    # -- recycling ---------------------------------------------------------------------------

    def _recycle(self, worker: Worker) -> None:
        """Start the successor of a worn-out worker, which stays alive until it has loaded.

        Then it is retired; if the successor cannot load, it goes back to work.
        """
        logger.info("%s %s; replacing it", worker.where, worker.recycled)
        successor = self._spawn()
        if successor is None:
            self._reinstate(worker)
        else:
            successor.predecessor, worker.successor = worker, successor

    def _reinstate(self, worker: Worker) -> None:
        """Put a worker whose recycling failed back to work."""
        worker.recycled, worker.successor = None, None
        with self._state.lock:
            woken = self._state.offer(worker) if worker.phase is Phase.WORN else None
        if woken is not None:
            woken.fire()

    # -- deaths ------------------------------------------------------------------------------

    def _on_exit(self, worker: Worker) -> None:
        process = worker.process
        # The worker's last words first: messages still in the pipe, then its output.
        try:
            while process.events.poll(0) and self._on_message(worker):
                pass
        except Exception:
            logger.exception("model %r: reading worker %d's last messages", self._name, worker.id)
        for fd in process.output_fds:
            process.read_output(fd)
            self._unregister(fd)
        self._unregister(process.events.fileno())
        self._unregister(process.exit_fd)
        self._unregister(worker.channel.fd)
        process.reap(EXIT_GRACE)
        how = process.describe_exit()
        stopping = self._state.phase == STOPPING
        with self._state.lock:
            self._state.workers.pop(worker.id, None)
            worker.exit = how
            self._state.set_phase(worker, Phase.DEAD)
            waiters, worker.death_waiters = worker.death_waiters, []
            if worker.loaded and self._state.live == 0 and not stopping:
                self._state.reason = (
                    f"model {self._name!r} has no live worker: worker {worker.id} {how}; "
                    "a replacement is starting"
                )
        fire(waiters)
        if worker.held:
            # Its task sees EOF now, even if a grandchild holds the worker's end.
            process.close_input()
        else:
            self._dispose(worker)
        if worker.predecessor is not None:  # a successor that did not load
            if worker.predecessor.phase is Phase.WORN:
                self._reinstate(worker.predecessor)
            worker.predecessor = None
        exiting = not threading.main_thread().is_alive()  # the interpreter, that is
        # A recycled worker's successor is already there: only replace what is missing.
        missing = self._config.workers - len(self._state.workers) - len(self._respawns)
        replace = missing > 0 and self._state.phase == RUNNING and not exiting
        if worker.loaded:
            # The model loads fine: whatever ended this worker, replace it at once.
            if replace:
                self._respawns.append(time.monotonic())
            if not (stopping or exiting or worker.recycled):
                logger.warning("%s %s; replacing it", worker.where, how)
        else:
            failed = worker.load_error is not None or self.policy.killed_while_loading(
                process.exit_code
            )
            if failed:
                reason = worker.load_error
                if reason is None:
                    reason = f"model {self._name!r} failed to load: its worker process {how}"
                self._load_failed(reason)
            elif not stopping:
                logger.warning("%s %s while loading; replacing it", worker.where, how)
                with self._state.lock:
                    if self._state.live == 0:
                        self._state.reason = (
                            f"model {self._name!r} has no live worker: worker {worker.id} "
                            f"{how} while loading; a replacement is starting"
                        )
            if replace:
                self._respawns.append(self.policy.respawn_at(worker_loaded=not failed))
        self._loading_initial.discard(worker.id)
        self._settle_start()

    def _load_failed(self, reason: str) -> None:
        if not self._warned:
            logger.warning("%s", reason)
        self._failing = self._warned = True
        self.policy.load_failed()
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
                dropped: list[Waiter] = []
            else:
                dropped = self._state.begin_stop(self._state.reason)
            waiter, self._state.start_waiter = self._state.start_waiter, None
        fire(dropped)
        if waiter is not None:
            waiter.fire()

    # -- timers ------------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        deadlines = list(self._respawns)
        workers = list(self._state.workers.values())
        hard = self._config.hard_timeout
        if hard is not None and workers:
            # Tasks start requests without telling this thread: look at them regularly.
            deadlines.append(time.monotonic() + hard / 4)
        deadlines += [w.retire_at for w in workers if w.retire_at is not None]
        if self._state.phase == STOPPING and self._drain_deadline != float("inf"):
            deadlines.append(0.0 if self._drain_deadline is None else self._drain_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        hard = self._config.hard_timeout
        for worker in list(self._state.workers.values()):
            since = worker.busy_since
            if hard is not None and since and not worker.timed_out and now - since >= hard:
                worker.timed_out = True
                worker.process.kill()
            if worker.retire_at is not None and now >= worker.retire_at:
                worker.process.kill()
        if self._state.phase == RUNNING:
            self._replace_missing(now)
        elif self._state.phase == STOPPING:
            self._advance_stop(now)

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
        missing = self._config.workers - len(self._state.workers) - len(self._respawns)
        self._respawns += [now + self.policy.backoff()] * missing
        if not self._state.workers:
            # No worker is even loading: nothing will serve the queue for a while.
            with self._state.lock:
                dropped = self._state.take_queue(ModelNotReady(self._state.reason))
            fire(dropped)

    def _advance_stop(self, now: float) -> None:
        """Retire idle workers; let running requests finish (up to ``STOP_GRACE``) first."""
        self._respawns = []
        if self._drain_deadline is None:
            self._drain_deadline = now + STOP_GRACE
        late = now >= self._drain_deadline
        for worker in list(self._state.workers.values()):
            if worker.phase is Phase.RETIRING:
                continue
            if late or worker.phase not in (Phase.BUSY, Phase.DRAINING):
                self._retire(worker)
        if late:
            self._drain_deadline = float("inf")

    def _finish(self) -> None:
        """Last act of the supervisor: no process, arena, fd or waiting task is left behind."""
        workers = list(self._state.workers.values())
        for worker in workers:
            worker.process.kill()
        for worker in workers:
            worker.process.reap(EXIT_GRACE)
        if self._template is not None:
            self._template.stop()
        with self._state.lock:
            waiters: list[Waiter] = []
            for worker in workers:
                worker.exit = worker.process.describe_exit()
                self._state.set_phase(worker, Phase.DEAD)
                waiters += worker.death_waiters
                worker.death_waiters = []
            self._state.workers.clear()
            self._state.phase = STOPPED
            if self._state.start_ok:
                self._state.reason = f"model {self._name!r} is stopped"
            waiters += self._state.stop_waiters
            self._state.stop_waiters = []
            if self._state.start_waiter is not None:
                waiters.append(self._state.start_waiter)
                self._state.start_waiter = None
            self._state.close_wake_pipe()
            waiters += self._state.take_queue(ModelNotReady(f"model {self._name!r} is stopped"))
            handed_back, self._state.handed_back = self._state.handed_back, []
        for worker in workers:
            if worker.held:
                worker.process.close_input()
            else:
                self._dispose(worker)
        for worker in handed_back:
            if worker.phase is Phase.DEAD and not worker.held and worker not in workers:
                self._dispose(worker)
        self._selector.close()
        fire(waiters)
