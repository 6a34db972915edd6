"""What request tasks and a pool's supervisor share: the workers, the models, the queue.

Every field of ``PoolState``, every worker's ``phase``, ``held`` and ``slots`` and every
member's counts change under its one lock, held only for a few operations at a time
(never across I/O or an await). Request tasks run on any event loop; the supervisor is a
plain thread. A worker is *held* by at most one party at a time, which alone may use its
request channel: a request task (``BUSY``), or the supervisor (every other phase).

A pool serves one model (a pool of its own) or several (a shared pool); each is a
``Member`` with a *slot*, the number frames carry. A worker serves the members whose
slots it has loaded; a request waits for a worker that has its member's slot.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from v2mount.errors import ModelNotReady, Overloaded, V2MountError
from v2mount.pool._config import PoolConfig
from v2mount.pool._ipc import Channel, DeclaredSpecs
from v2mount.pool._lifecycle import LIVE, Phase, move
from v2mount.pool._process import WorkerProcess
from v2mount.pool._waiter import Waiter
from v2mount.runner import RunnerStatistics

if TYPE_CHECKING:
    from v2mount.model import Model
    from v2mount.pool._shipping import ModelPackage

__all__ = [
    "GONE",
    "JOINING",
    "LEAVING",
    "NEW",
    "RUNNING",
    "SERVING",
    "STARTING",
    "STOPPED",
    "STOPPING",
    "Member",
    "PoolState",
    "Ticket",
    "Worker",
]

# Phases of a pool.
NEW, STARTING, RUNNING, STOPPING, STOPPED = range(5)
# Phases of a member: loading in the workers, served, being dropped by them, out.
JOINING, SERVING, LEAVING, GONE = "joining", "serving", "leaving", "gone"
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
        "label",
        "load_error",
        "loaded",
        "loading",
        "phase",
        "predecessor",
        "process",
        "recycled",
        "retire_at",
        "served",
        "slot",
        "slots",
        "successor",
        "timed_out",
        "unloading",
    )

    def __init__(self, process: WorkerProcess, label: str) -> None:
        self.process = process
        #: What it serves, for messages: ``model 'x'`` or ``pool 'p'``.
        self.label = label
        self.id = process.id
        #: The members it has loaded (changed under the lock: they say where requests go).
        self.slots: set[int] = set()
        #: Members it was asked to load and has not answered for, in the order it loads
        #: them (the first is loading now); members it was asked to drop.
        self.loading: list[int] = list(process.slots)
        self.unloading: set[int] = set()
        #: The member of the request it runs (hard timeouts, counts).
        self.slot = -1
        self.channel = Channel(process.conn.fileno())
        os.set_blocking(self.channel.fd, False)
        self.phase = Phase.LOADING
        #: A request task holds it (and alone uses its channel); else the supervisor does.
        self.held = False
        #: When the request it runs was sent (hard timeouts); 0 when it runs none.
        self.busy_since = 0.0
        self.served = 0
        #: It reported ``Serving`` (it may have died since).
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
        return f"worker {self.id} of {self.label} (pid {self.pid})"


class Member:
    """One model of a pool (a model version): its slot, its settings, its counts."""

    __slots__ = (
        "busy",
        "config",
        "declared",
        "failure",
        "live",
        "loaded",
        "model",
        "name",
        "package",
        "phase",
        "queued",
        "reason",
        "sent",
        "slot",
        "waiters",
    )

    def __init__(self, slot: int, model: Model, config: PoolConfig) -> None:
        self.slot = slot
        self.model = model
        self.name = model.settings.name
        #: Its own ``max_queue_size`` and ``hard_timeout`` hold; the rest are the pool's.
        self.config = config
        self.phase = JOINING
        self.reason = f"model {self.name!r} is loading"
        #: The supervisor has taken it up (sent it to workers, or found it cannot).
        self.sent = False
        self.package: ModelPackage | None = None
        #: Live workers that have it loaded; requests running it; requests waiting for it.
        self.live = self.busy = self.queued = 0
        #: It loaded in some worker; why it failed to load (the first failure).
        self.loaded = False
        self.failure: str | None = None
        #: What its ``load`` declared in a worker (``start`` returns it).
        self.declared: DeclaredSpecs | None = None
        #: Fired when it has joined (or failed to), and when it has left.
        self.waiters: list[Waiter] = []


class Ticket:
    """A request waiting for a worker: it gets the worker itself, or an error."""

    __slots__ = ("error", "member", "waiter", "worker")

    def __init__(self, member: Member) -> None:
        self.member = member
        self.waiter = Waiter()
        self.worker: Worker | None = None
        self.error: V2MountError | None = None


def fire(waiters: Iterable[Waiter]) -> None:
    """Wake waiting tasks (never under the lock)."""
    for waiter in waiters:
        waiter.fire()


class PoolState:
    """The lock-guarded state of one pool.

    ``config``: the pool's own settings (``workers``, the per-worker limits); its
    members' settings hold for their queues and timeouts.
    """

    def __init__(self, name: str, config: PoolConfig, *, shared: bool) -> None:
        self.name = name
        self.shared = shared
        #: What it serves, for messages.
        self.label = f"pool {name!r}" if shared else f"model {name!r}"
        self.config = config
        self.lock = threading.Lock()
        self.queue: deque[Ticket] = deque()
        self.idle: list[Worker] = []
        self.workers: dict[int, Worker] = {}
        self.members: dict[int, Member] = {}
        #: Workers the supervisor must look at: to drain, worn out, let go, idle at a stop.
        self.handed_back: list[Worker] = []
        #: Members whose workers must drop them (they are ``LEAVING``).
        self.leaving: list[Member] = []
        self.live = 0
        self.busy = 0
        self.phase = NEW
        self.reason = f"{self.label} is not started"
        self.start_ok = False
        self.stop_waiters: list[Waiter] = []
        self.wake_read = self.wake_write = -1

    def ready(self, member: Member) -> bool:
        return (
            member.live > 0
            and member.phase in (JOINING, SERVING)
            and self.phase in (STARTING, RUNNING)
        )

    def reason_of(self, member: Member) -> str:
        """Why ``member`` is not served (its own reason, or its pool's)."""
        if member.phase in (LEAVING, GONE):
            return member.reason
        if self.phase not in (STARTING, RUNNING) or self.live == 0:
            return self.reason
        if member.phase is SERVING and member.live == 0:
            return f"model {member.name!r} is loaded in no live worker of {self.label}"
        return member.reason

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
        held = (phase in _HELD) - (before in _HELD)
        self.busy += held
        live = (phase in LIVE) - (before in LIVE)
        self.live += live
        if held:
            member = self.members.get(worker.slot)
            if member is not None:
                member.busy += held
        if live:
            for slot in worker.slots:
                member = self.members.get(slot)
                if member is not None:
                    member.live += live
        if before is Phase.IDLE:
            self.idle.remove(worker)
        if phase is Phase.IDLE:
            self.idle.append(worker)

    def add_slot(self, worker: Worker, slot: int) -> None:
        """The worker has loaded the member of ``slot`` (lock held)."""
        member = self.members.get(slot)
        if slot not in worker.slots:
            worker.slots.add(slot)
            if member is not None and worker.phase in LIVE:
                member.live += 1

    def drop_slot(self, worker: Worker, slot: int) -> None:
        """The worker no longer serves the member of ``slot`` (lock held)."""
        member = self.members.get(slot)
        if slot in worker.slots:
            worker.slots.discard(slot)
            if member is not None and worker.phase in LIVE:
                member.live -= 1

    # -- the request path -----------------------------------------------------------------

    def acquire(self, member: Member) -> Worker | Ticket:
        """An idle worker that has ``member``, now held by the caller; or a ticket to wait
        on for one."""
        with self.lock:
            if not self.ready(member):
                raise ModelNotReady(self.reason_of(member))
            slot = member.slot
            for index in range(len(self.idle) - 1, -1, -1):
                # The most recently used first: its caches are warm.
                worker = self.idle[index]
                if slot in worker.slots:
                    self._hold(worker, slot)
                    return worker
            if member.queued >= member.config.max_queue_size:
                raise Overloaded(
                    f"model {member.name!r} has {member.queued} requests waiting for a worker"
                )
            ticket = Ticket(member)
            self.queue.append(ticket)
            member.queued += 1
            return ticket

    def _hold(self, worker: Worker, slot: int) -> None:
        if worker.phase in _HELD and worker.slot != slot:
            # Handed from one request straight to the next: the busy count moves along.
            for moved, by in ((worker.slot, -1), (slot, 1)):
                member = self.members.get(moved)
                if member is not None:
                    member.busy += by
        worker.slot = slot
        self.set_phase(worker, Phase.BUSY)
        worker.held = True

    def withdraw(self, ticket: Ticket) -> None:
        """The caller of a ticket gave up: leave the queue, or pass its worker on."""
        with self.lock:
            worker, ticket.worker = ticket.worker, None
            if worker is None:
                try:
                    self.queue.remove(ticket)
                except ValueError:
                    pass
                else:
                    ticket.member.queued -= 1
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
        """Give a free worker to the first ticket for a member it has, else make it idle
        (lock held).

        Returns the ticket's waiter, to fire once the lock is released.
        """
        woken = self._match(worker)
        if woken is not None:
            return woken
        self.set_phase(worker, Phase.IDLE)
        if self.phase not in (STARTING, RUNNING):
            self._hand_back(worker)  # the supervisor retires idle workers while stopping
        return None

    def rematch(self, worker: Worker) -> Waiter | None:
        """An idle worker loaded another member: a ticket waiting for it may take it."""
        return self._match(worker) if worker.phase is Phase.IDLE else None

    def _match(self, worker: Worker) -> Waiter | None:
        if not self.queue or self.phase not in (STARTING, RUNNING):
            return None
        for index, ticket in enumerate(self.queue):
            if ticket.member.slot in worker.slots:
                del self.queue[index]
                ticket.member.queued -= 1
                ticket.worker = worker
                self._hold(worker, ticket.member.slot)
                return ticket.waiter
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

    def take_queue(self, error: V2MountError, member: Member | None = None) -> list[Waiter]:
        """Fail every queued ticket, or those of ``member`` (lock held); the caller fires
        the waiters."""
        waiters = []
        kept: deque[Ticket] = deque()
        for ticket in self.queue:
            if member is not None and ticket.member is not member:
                kept.append(ticket)
                continue
            ticket.error = error
            ticket.member.queued -= 1
            waiters.append(ticket.waiter)
        self.queue = kept
        return waiters

    def begin_stop(self, reason: str | None = None) -> list[Waiter]:
        """Enter the stopping phase (lock held); returns the queued tickets' waiters."""
        if self.phase == STOPPING:
            return []
        self.phase = STOPPING
        self.reason = reason or f"{self.label} is stopping"
        self.wake()
        return self.take_queue(ModelNotReady(self.reason))

    def statistics(self, member: Member) -> RunnerStatistics:
        with self.lock:
            return RunnerStatistics(
                workers=self.config.workers,
                live_workers=member.live,
                queued=member.queued,
                in_flight=member.queued + member.busy,
                max_queue_size=member.config.max_queue_size,
            )
