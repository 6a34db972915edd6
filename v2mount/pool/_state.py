"""What a pool's callers and its monitor thread share: the queue, the workers, the phase.

Every field of ``PoolState`` changes under its one lock, held only for a few
operations at a time (never across I/O). Callers run on any event loop; the monitor
is a plain thread.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable

from v2mount.errors import ModelNotReady, Overloaded, V2MountError
from v2mount.pool._ipc import RequestWire
from v2mount.pool._process import WorkerProcess
from v2mount.pool._waiter import Waiter
from v2mount.runner import RunnerStatistics
from v2mount.types import InferenceResponse

__all__ = [
    "ABANDONED",
    "DONE",
    "NEW",
    "QUEUED",
    "RUNNING",
    "SENT",
    "STARTING",
    "STOPPED",
    "STOPPING",
    "Job",
    "PoolState",
]

# Phases of a pool.
NEW, STARTING, RUNNING, STOPPING, STOPPED = range(5)
# States of a job.
QUEUED, SENT, DONE, ABANDONED = range(4)


class Job:
    """One request's way through the pool."""

    __slots__ = ("outcome", "seq", "state", "waiter", "wire")

    def __init__(self, seq: int, wire: RequestWire | None, waiter: Waiter) -> None:
        self.seq = seq
        self.wire = wire
        self.waiter = waiter
        self.state = QUEUED
        self.outcome: InferenceResponse | V2MountError | None = None


def resolve(jobs: Iterable[Job], outcome: InferenceResponse | V2MountError) -> None:
    """Give jobs their outcome and wake their callers (never under the lock)."""
    for job in jobs:
        job.outcome = outcome
        job.waiter.fire()


class PoolState:
    """The lock-guarded state of one pool."""

    def __init__(self, name: str, size: int, max_queue_size: int) -> None:
        self.name = name
        self.size = size
        self.max_queue_size = max_queue_size
        self.lock = threading.Lock()
        self.queue: deque[Job] = deque()
        self.idle: list[WorkerProcess] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.live = 0
        self.running = 0
        self.phase = NEW
        self.reason = f"model {name!r} is not started"
        self.start_ok = False
        self.start_waiter: Waiter | None = None
        self.stop_waiters: list[Waiter] = []
        self.wake_read = self.wake_write = -1
        self._wake_pending = False

    @property
    def ready(self) -> bool:
        return self.live > 0 and self.phase in (STARTING, RUNNING)

    def open_wake_pipe(self) -> None:
        """The pipe callers write to so the monitor's ``select`` returns (lock held)."""
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    def close_wake_pipe(self) -> None:
        """Lock held, so no caller writes to a closed (or reused) descriptor."""
        if self.wake_read >= 0:
            os.close(self.wake_read)
            os.close(self.wake_write)
        self.wake_read = self.wake_write = -1

    def wake(self) -> None:
        """Wake the monitor thread (lock held)."""
        if not self._wake_pending and self.wake_write >= 0:
            self._wake_pending = True
            try:
                os.write(self.wake_write, b"\0")
            except BlockingIOError:
                pass

    def woken(self) -> None:
        """Called by the monitor once it drained the wake pipe."""
        with self.lock:
            self._wake_pending = False

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.phase not in (STARTING, RUNNING) or self.live == 0:
                raise ModelNotReady(self.reason)
            waiting = len(self.queue) - len(self.idle)
            if waiting >= self.max_queue_size:
                raise Overloaded(f"model {self.name!r} has {waiting} requests waiting for a worker")
            self.queue.append(job)
            if self.idle:
                self.wake()

    def abandon(self, job: Job) -> None:
        """The caller gave up: withdraw a queued job, let a running one's result drop."""
        with self.lock:
            if job.state == QUEUED:
                try:
                    self.queue.remove(job)
                except ValueError:
                    pass
                job.state = ABANDONED
            elif job.state == SENT:
                job.state = ABANDONED

    def take_queue(self) -> list[Job]:
        """Empty the queue (lock held); the caller resolves the jobs."""
        jobs = list(self.queue)
        self.queue.clear()
        for job in jobs:
            job.state = DONE
        return jobs

    def begin_stop(self, reason: str | None = None) -> list[Job]:
        """Enter the stopping phase (lock held); returns the queued jobs to fail."""
        if self.phase == STOPPING:
            return []
        self.phase = STOPPING
        self.reason = reason or f"model {self.name!r} is stopping"
        self.wake()
        return self.take_queue()

    def statistics(self) -> RunnerStatistics:
        with self.lock:
            return RunnerStatistics(
                workers=self.size,
                live_workers=self.live,
                queued=max(0, len(self.queue) - len(self.idle)),
                in_flight=len(self.queue) + self.running,
                max_queue_size=self.max_queue_size,
            )
