"""The supervisor: the one thread of a pool that owns its processes' lives.

It starts the workers, reads their control pipes (``Ready``, ``LoadFailed``,
``Serving``, ``Unloaded``, ``Log``) and their output, notices a death at once (pidfd, or
the process sentinel) and replaces the dead, kills a worker stuck past ``hard_timeout``,
finishes the exchange of a request whose task was cancelled, recycles worn-out workers,
has every worker load a model that joins a shared pool and drop one that leaves
(``Load``, ``Unload``), and runs the shutdown. It is never
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
from v2mount.pool._arena import Arena, arena_path, unlink_quietly
from v2mount.pool._ipc import (
    DeclaredSpecs,
    Load,
    LoadFailed,
    Log,
    Ready,
    Serving,
    Unload,
    Unloaded,
    updates_of,
)
from v2mount.pool._lifecycle import Phase, Policy, from_outside
from v2mount.pool._process import WorkerProcess
from v2mount.pool._shipping import ModelPackage, pack_model
from v2mount.pool._state import (
    GONE,
    JOINING,
    LEAVING,
    RUNNING,
    SERVING,
    STARTING,
    STOPPED,
    STOPPING,
    Member,
    PoolState,
    Worker,
    fire,
)
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
        *,
        context: SpawnContext,
        metrics_sink: MetricsSink,
        arena_paths: set[str],
        file_name: str,
    ) -> None:
        self._state = state
        self._config = state.config
        self._name = state.name
        self._label = state.label
        #: The pool's name as it may appear in a file name (arenas are named after it).
        self._file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", file_name)[:48]
        self._context = context
        self._sink = metrics_sink
        self.policy = Policy(
            self._config.max_requests_per_worker, self._config.max_worker_memory_mb
        )
        #: Arenas that exist now; the pool's finalizer removes them if the process exits.
        self._arena_paths = arena_paths
        self._selector = selectors.DefaultSelector()
        #: The members every new worker loads (joined or joining, not leaving), by slot.
        self._packages: dict[int, ModelPackage] = {}
        self._template: Template | None = None
        self._worker_ids = itertools.count(1)
        self._loading_initial: set[int] = set()
        # Sibling workers fail to load the same way: one traceback per member and one
        # warning for a run of failures, until a worker loads again.
        self._failing: set[int] = set()
        self._warned = False
        self._respawns: list[float] = []
        self._drain_deadline: float | None = None

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """The thread's body; whatever happens, ``_finish`` leaves nothing behind."""
        selector = self._selector
        selector.register(self._state.wake_read, selectors.EVENT_READ, (_WAKE, None))
        try:
            self._pack(self._take_new())
            if self._packages:
                log = functools.partial(self._log, 0)
                threads = self._config.threads_per_worker
                self._template = Template(self._context, self._packages, threads, self._name, log)
                self._template.start()
                for _ in range(self._config.workers):
                    self._spawn(initial=True)
            else:
                with self._state.lock:
                    failures = [m.failure for m in self._state.members.values() if m.failure]
                    self._state.reason = failures[0] if failures else self._state.reason
            self._settle_members()
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
            leaving, self._state.leaving = self._state.leaving, []
        for worker in handed_back:
            self._take_back(worker)
        if self._state.phase in (STARTING, RUNNING):
            self._join(self._take_new())
        for member in leaving:
            self._leave(member)
        self._settle_members()

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
            "[%s %s, worker %d] %s",
            "pool" if self._state.shared else "model",
            self._name,
            worker_id,
            text,
            extra={"model_name": self._name, "worker_id": worker_id},
        )

    def _apply_metrics(self, updates: list[MetricUpdate]) -> None:
        apply_metrics(self._sink, updates, self._name, logger)

    # -- members joining and leaving -------------------------------------------------------

    def _take_new(self) -> list[Member]:
        """Members registered since last time, now taken up."""
        with self._state.lock:
            new = [m for m in self._state.members.values() if not m.sent]
            for member in new:
                member.sent = True
        return new

    def _pack(self, members: list[Member]) -> list[Member]:
        """Pickle each member for its workers; those that cannot be fail at once."""
        packed = []
        for member in members:
            if member.phase is not JOINING:
                continue  # left before it joined
            try:
                self._packages[member.slot] = pack_model(member.model)
            except Exception as exc:
                member.failure = f"model {member.name!r} cannot be sent to worker processes: {exc}"
            else:
                packed.append(member)
        return packed

    def _join(self, members: list[Member]) -> None:
        """Have every worker load the members that joined the running pool."""
        for member in self._pack(members):
            package = self._packages[member.slot]
            for worker in list(self._state.workers.values()):
                if worker.phase is not Phase.RETIRING:
                    self._command(worker, Load(member.slot, package))
                    worker.loading.append(member.slot)

    def _leave(self, member: Member) -> None:
        """Have every worker drop a member that leaves the pool."""
        self._packages.pop(member.slot, None)
        for worker in list(self._state.workers.values()):
            if member.slot in worker.slots or member.slot in worker.loading:
                with self._state.lock:
                    self._state.drop_slot(worker, member.slot)
                self._command(worker, Unload(member.slot))
                worker.unloading.add(member.slot)

    def _command(self, worker: Worker, command: Load | Unload) -> None:
        try:
            worker.process.events.send(command)
        except OSError:
            pass  # it is dying: its exit fd fires

    def _settle_members(self) -> None:
        """Answer the members that have joined (or failed to) or left, every worker told."""
        state = self._state
        waiting = [w for w in state.workers.values() if w.phase is not Phase.DEAD]
        fired: list[Waiter] = []
        with state.lock:
            for member in list(state.members.values()):
                slot = member.slot
                if member.phase is JOINING and member.sent:
                    # Loaded counts once the worker serves (its first models all loaded).
                    if any(
                        slot in w.loading or (w.phase is Phase.LOADING and slot in w.slots)
                        for w in waiting
                    ):
                        continue
                    if member.loaded:
                        member.phase, member.reason = SERVING, ""
                    elif member.failure is None and self._respawns and state.phase == RUNNING:
                        continue  # its workers were killed: their replacements load it
                    else:
                        member.phase = GONE
                        member.reason = member.failure or state.reason
                        self._packages.pop(slot, None)
                        del state.members[slot]
                elif member.phase is LEAVING:
                    if any(slot in w.unloading for w in waiting):
                        continue
                    member.phase = GONE
                    del state.members[slot]
                else:
                    continue
                fired += member.waiters
                member.waiters = []
        fire(fired)

    # -- workers' messages -----------------------------------------------------------------

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
            self._on_loaded(worker, message)
        elif isinstance(message, LoadFailed):
            self._on_load_failed(worker, message)
        elif isinstance(message, Serving):
            self._on_serving(worker, message)
        elif isinstance(message, Unloaded):
            self._on_unloaded(worker, message)
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")
        return True

    def _answered(self, worker: Worker, slot: int) -> None:
        if slot in worker.loading:
            worker.loading.remove(slot)

    def _on_loaded(self, worker: Worker, ready: Ready) -> None:
        self._apply_metrics(ready.updates)
        self._answered(worker, ready.slot)
        self._failing.discard(ready.slot)
        woken: Waiter | None = None
        with self._state.lock:
            member = self._state.members.get(ready.slot)
            if member is None or member.phase in (LEAVING, GONE):
                return  # it left meanwhile: the worker drops it too (``_leave``)
            self._state.add_slot(worker, ready.slot)
            member.loaded = True
            if ready.declared is not None and member.declared is None:
                member.declared = DeclaredSpecs(*ready.declared)
            woken = self._state.rematch(worker)
        if woken is not None:
            woken.fire()
        self._settle_members()

    def _on_load_failed(self, worker: Worker, failed: LoadFailed) -> None:
        self._apply_metrics(failed.updates)
        self._answered(worker, failed.slot)
        member = self._state.members.get(failed.slot)
        name = member.name if member is not None else self._name
        worker.load_error = f"model {name!r} failed to load: {failed.text}"
        if member is not None:
            self._failed(member, worker.load_error)
        if failed.traceback and failed.slot not in self._failing:
            what = f"model {name!r}" if self._state.shared else "the model"
            text = f"loading {what} failed\n{failed.traceback.rstrip()}"
            self._log(worker.id, logging.ERROR, text)
            self._failing.add(failed.slot)
        if worker.loaded:
            logger.warning("%s: %s", worker.where, worker.load_error)
        self._settle_members()

    def _failed(self, member: Member, reason: str) -> None:
        """A load of ``member`` failed; one that never loaded goes to no new worker."""
        if member.failure is None:
            member.failure = reason
        if member.phase is JOINING and not member.loaded:
            self._packages.pop(member.slot, None)

    def _on_unloaded(self, worker: Worker, unloaded: Unloaded) -> None:
        worker.unloading.discard(unloaded.slot)
        member = self._state.members.get(unloaded.slot)
        if unloaded.freed is False and member is not None:
            logger.warning(
                "%s: model %r is still referenced after it was unloaded: its memory is "
                "not released (a module-level reference to the model?)",
                worker.where,
                member.name,
            )
        self._settle_members()

    def _on_serving(self, worker: Worker, ready: Serving) -> None:
        self._warned = False
        process = worker.process
        if ready.has_arena and process.arena_path is not None:
            process.arena = Arena.attach(process.arena_path)
            # Both ends hold it open now: without a name, no crash can leak it.
            unlink_quietly(process.arena_path)
        self.policy.loaded()
        self._loading_initial.discard(worker.id)
        worker.loaded = True
        woken: Waiter | None = None
        with self._state.lock:
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
        self._settle_members()
        self._settle_start()

    # -- starting, retiring and disposing of workers -----------------------------------------

    def _new_process(self, spec: WorkerSpec) -> WorkerProcess:
        """The one place a worker process is started."""
        assert self._template is not None
        return self._template.fork_worker(
            spec,
            self._packages,
            f"v2mount-{self._name}-{spec.worker_id}",
            functools.partial(self._log, spec.worker_id),
        )

    def _spawn(self, *, initial: bool = False) -> Worker | None:
        if not self._packages:
            self._load_failed(f"{self._label} has no model to load")
            return None
        worker_id = next(self._worker_ids)
        path = arena_path(f"v2mount-{os.getpid()}-{self._file_name}-{worker_id}")
        spec = WorkerSpec(
            worker_id=worker_id,
            slots=tuple(self._packages),
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
        worker = Worker(process, self._label)
        # Those the template does not hold, it loads once it serves the others.
        for slot in spec.slots:
            if slot not in process.slots:
                self._command(worker, Load(slot, self._packages[slot]))
                worker.loading.append(slot)
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
        if worker.loading and not from_outside(process.exit_code):
            # It died loading this one (they load in order): that load failed.
            culprit = self._state.members.get(worker.loading[0])
            if culprit is not None:
                self._failed(culprit, f"model {culprit.name!r} failed to load: its worker {how}")
        with self._state.lock:
            self._state.workers.pop(worker.id, None)
            worker.exit = how
            self._state.set_phase(worker, Phase.DEAD)
            waiters, worker.death_waiters = worker.death_waiters, []
            if worker.loaded and self._state.live == 0 and not stopping:
                self._state.reason = (
                    f"{self._label} has no live worker: worker {worker.id} {how}; "
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
                    reason = f"{self._label} failed to load: its worker process {how}"
                self._load_failed(reason)
            elif not stopping:
                logger.warning("%s %s while loading; replacing it", worker.where, how)
                with self._state.lock:
                    if self._state.live == 0:
                        self._state.reason = (
                            f"{self._label} has no live worker: worker {worker.id} "
                            f"{how} while loading; a replacement is starting"
                        )
            if replace:
                self._respawns.append(self.policy.respawn_at(worker_loaded=not failed))
        self._loading_initial.discard(worker.id)
        self._settle_members()
        self._settle_start()

    def _load_failed(self, reason: str) -> None:
        if not self._warned:
            logger.warning("%s", reason)
        self._warned = True
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
        fire(dropped)

    # -- timers ------------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        deadlines = list(self._respawns)
        workers = list(self._state.workers.values())
        with self._state.lock:
            timeouts = [m.config.hard_timeout for m in self._state.members.values()]
        hard = min((t for t in timeouts if t is not None), default=None)
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
        for worker in list(self._state.workers.values()):
            since = worker.busy_since
            member = self._state.members.get(worker.slot)
            hard = member.config.hard_timeout if member is not None else None
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
                self._state.reason = f"{self._label} is stopped"
            waiters += self._state.stop_waiters
            self._state.stop_waiters = []
            for member in self._state.members.values():
                if member.phase is JOINING:
                    member.reason = member.failure or self._state.reason
                elif member.phase is not GONE:
                    member.reason = self._state.reason
                member.phase = GONE
                waiters += member.waiters
                member.waiters = []
            self._state.members.clear()
            self._state.close_wake_pipe()
            waiters += self._state.take_queue(ModelNotReady(f"{self._label} is stopped"))
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
