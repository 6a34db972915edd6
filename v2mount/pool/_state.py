"""What request tasks and a pool's supervisor share: the workers, the idle list, the queue.

Every field of ``PoolState`` and every worker's ``phase`` and ``holder`` change under its
one lock, held only for a few operations at a time (never across I/O or an await). Request
tasks run on any event loop; the supervisor is a plain thread. A worker is *held* by at
most one party at a time, which alone may use its request channel: a request task
(``BUSY``), or the supervisor (every other phase).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable

from v2mount.errors import ModelNotReady, Overloaded, V2MountError
from v2mount.pool._config import PoolConfig
from v2mount.pool._ipc import Channel, DeclaredSpecs
from v2mount.pool._lifecycle import LIVE, Phase, move
from v2mount.pool._process import WorkerProcess
from v2mount.pool._waiter import Waiter
from v2mount.runner import RunnerStatistics

__all__ = ["NEW", "RUNNING", "STARTING", "STOPPED", "STOPPING", "PoolState", "Ticket", "Worker"]

# Phases of a pool.
NEW, STARTING, RUNNING, STOPPING, STOPPED = range(5)
#: Phases of a worker that runs a request (``busy`` counts them).
_HELD = frozenset({Phase.BUSY, Phase.DRAINING})


class Worker:
    """One worker process as the pool sees it: its phase, its channel, its record."""

    __slots__ = (
        "busy_since",
        "channel",
        "death_waiters",
        "disposed",
        "exit",
        "held",
        "id",
        "load_error",
        "loaded",
        "model",
        "phase",
        "predecessor",
        "process",
        "recycled",
        "retire_at",
        "served",
        "successor",
        "timed_out",
    )

    def __init__(self, process: WorkerProcess, model: str) -> None:
        self.process = process
        self.model = model
        self.id = process.id
        self.channel = Channel(process.conn.fileno())
        os.set_blocking(self.channel.fd, False)
        self.phase = Phase.LOADING
        #: A request task holds it (and alone uses its channel); else the supervisor does.
        self.held = False
        #: When the request it runs was sent (hard timeouts); 0 when it runs none.
        self.busy_since = 0.0
        self.served = 0
        #: It reported ``Ready`` (it may have died since).
        self.loaded = False
        self.load_error: str | None = None
        #: Killed for running one request longer than the pool's ``hard_timeout``.
        self.timed_out = False
        #: How the process ended (``describe_exit``), once the supervisor reaped it.
        self.exit: str | None = None
        #: Request tasks waiting for ``exit`` (they saw EOF before the supervisor saw the death).
        self.death_waiters: list[Waiter] = []
        #: Why the pool is replacing this healthy worker, and the worker replacing it.
        self.recycled: str | None = None
        self.successor: Worker | None = None
        self.predecessor: Worker | None = None
        #: When a retiring worker must have exited (else it is killed).
        self.retire_at: float | None = None
        #: Its descriptors are closed (their numbers may belong to others by now).
        self.disposed = False

    def dispose(self) -> bool:
        """Close its descriptors and arena once (the process must be reaped); ``False``
        if that was done already."""
        if self.disposed:
            return False
        self.disposed = True
        self.process.dispose()
        return True

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def where(self) -> str:
        return f"worker {self.id} of model {self.model!r} (pid {self.pid})"


class Ticket:
    """A request waiting for a worker: it gets the worker itself, or an error."""

    __slots__ = ("error", "waiter", "worker")

    def __init__(self) -> None:
        self.waiter = Waiter()
        self.worker: Worker | None = None
        self.error: V2MountError | None = None


def fire(waiters: Iterable[Waiter]) -> None:
    """Wake waiting tasks (never under the lock)."""
    for waiter in waiters:
        waiter.fire()


class PoolState:
    """The lock-guarded state of one pool."""

    def __init__(self, name: str, config: PoolConfig) -> None:
        self.name = name
        self.config = config
        self.lock = threading.Lock()
        self.queue: deque[Ticket] = deque()
        self.idle: list[Worker] = []
        self.workers: dict[int, Worker] = {}
        #: Workers the supervisor must look at: to drain, worn out, let go, idle at a stop.
        self.handed_back: list[Worker] = []
        self.live = 0
        self.busy = 0
        self.phase = NEW
        self.reason = f"model {name!r} is not started"
        self.start_ok = False
        #: What the workers' ``load`` declared (``start`` returns it).
        self.declared: DeclaredSpecs | None = None
        self.start_waiter: Waiter | None = None
        self.stop_waiters: list[Waiter] = []
        self.wake_read = self.wake_write = -1

    @property
    def ready(self) -> bool:
        return self.live > 0 and self.phase in (STARTING, RUNNING)

    # -- waking the supervisor ---------------------------------------------------------

    def open_wake_pipe(self) -> None:
        """The pipe tasks write to so the supervisor's ``select`` returns (lock held)."""
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    def close_wake_pipe(self) -> None:
        """Lock held, so no task writes to a closed (or reused) descriptor."""
        if self.wake_read >= 0:
            os.close(self.wake_read)
            os.close(self.wake_write)
        self.wake_read = self.wake_write = -1

    def wake(self) -> None:
        """Wake the supervisor thread (lock held)."""
        if self.wake_write >= 0:
            try:
                os.write(self.wake_write, b"\0")
            except BlockingIOError:
                pass  # it has plenty to read already

    def set_phase(self, worker: Worker, phase: Phase) -> None:
        """Move a worker to ``phase`` (lock held), keeping the counts and the idle list."""
        before = worker.phase
        if before is phase:
            return
        move(worker, phase)
        self.busy += (phase in _HELD) - (before in _HELD)
        self.live += (phase in LIVE) - (before in LIVE)
        if before is Phase.IDLE:
            self.idle.remove(worker)
        if phase is Phase.IDLE:
            self.idle.append(worker)

    # -- the request path -----------------------------------------------------------------

    def acquire(self) -> Worker | Ticket:
        """An idle worker, now held by the caller; or a ticket to wait on for one."""
        with self.lock:
            if self.phase not in (STARTING, RUNNING) or self.live == 0:
                raise ModelNotReady(self.reason)
            if self.idle:
                worker = self.idle[-1]  # the most recently used: its caches are warm
                self.set_phase(worker, Phase.BUSY)
                worker.held = True
                return worker
            if len(self.queue) >= self.config.max_queue_size:
                raise Overloaded(
                    f"model {self.name!r} has {len(self.queue)} requests waiting for a worker"
                )
            ticket = Ticket()
            self.queue.append(ticket)
            return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """The caller of a ticket gave up: leave the queue, or pass its worker on."""
        with self.lock:
            worker, ticket.worker = ticket.worker, None
            if worker is None:
                try:
                    self.queue.remove(ticket)
                except ValueError:
                    pass
                return
            woken = self._next(worker)
        if woken is not None:
            woken.fire()

    def release(self, worker: Worker, worn: str | None) -> None:
        """A request task is done with a worker that answered (``worn``: recycle it)."""
        with self.lock:
            worker.busy_since = 0.0
            if worn is not None and worker.phase is Phase.BUSY and self.phase == RUNNING:
                worker.recycled, worker.held = worn, False
                self.set_phase(worker, Phase.WORN)
                self._hand_back(worker)
                return
            woken = self._next(worker)
        if woken is not None:
            woken.fire()

    def _next(self, worker: Worker) -> Waiter | None:
        """A request task lets go of a worker that answered (lock held)."""
        worker.busy_since = 0.0
        worker.held = False
        if worker.phase not in _HELD:
            # Dead, or retired by a stop: the supervisor has it.
            self._hand_back(worker)
            return None
        return self.offer(worker)

    def offer(self, worker: Worker) -> Waiter | None:
        """Give a free worker to the first ticket, else make it idle (lock held).

        Returns the ticket's waiter, to fire once the lock is released.
        """
        if self.queue and self.phase in (STARTING, RUNNING):
            ticket = self.queue.popleft()
            ticket.worker = worker
            self.set_phase(worker, Phase.BUSY)
            worker.held = True
            return ticket.waiter
        self.set_phase(worker, Phase.IDLE)
        if self.phase not in (STARTING, RUNNING):
            self._hand_back(worker)  # the supervisor retires idle workers while stopping
        return None

    def _hand_back(self, worker: Worker) -> None:
        if self.phase == STOPPED:
            # The supervisor is gone: what it would have done with the worker is done.
            if worker.phase is Phase.DEAD and not worker.held:
                worker.dispose()
            return
        self.handed_back.append(worker)
        self.wake()

    def drain(self, worker: Worker) -> None:
        """A request task was cancelled mid-exchange: the supervisor finishes it."""
        with self.lock:
            worker.held = False
            if worker.phase is Phase.BUSY:
                self.set_phase(worker, Phase.DRAINING)
            self._hand_back(worker)

    def let_go(self, worker: Worker) -> None:
        """A request task is done with a worker that died (or was retired) under it."""
        with self.lock:
            worker.busy_since, worker.held = 0.0, False
            if worker.phase is Phase.BUSY:
                # Its process has not been seen to end yet: the supervisor will.
                self.set_phase(worker, Phase.RETIRING)
            self._hand_back(worker)

    def exit_of(self, worker: Worker) -> str | Waiter:
        """How the worker ended, or a waiter the supervisor fires once it knows."""
        with self.lock:
            if worker.exit is not None:
                return worker.exit
            waiter = Waiter()
            worker.death_waiters.append(waiter)
            return waiter

    # -- the supervisor's side ------------------------------------------------------------

    def take_queue(self, error: V2MountError) -> list[Waiter]:
        """Fail every queued ticket (lock held); the caller fires the waiters."""
        waiters = []
        for ticket in self.queue:
            ticket.error = error
            waiters.append(ticket.waiter)
        self.queue.clear()
        return waiters

    def begin_stop(self, reason: str | None = None) -> list[Waiter]:
        """Enter the stopping phase (lock held); returns the queued tickets' waiters."""
        if self.phase == STOPPING:
            return []
        self.phase = STOPPING
        self.reason = reason or f"model {self.name!r} is stopping"
        self.wake()
        return self.take_queue(ModelNotReady(self.reason))

    def statistics(self) -> RunnerStatistics:
        with self.lock:
            return RunnerStatistics(
                workers=self.config.workers,
                live_workers=self.live,
                queued=len(self.queue),
                in_flight=len(self.queue) + self.busy,
                max_queue_size=self.config.max_queue_size,
            )
