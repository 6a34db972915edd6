"""The life of a pool's workers: their phases, the moves between them, and the policy.

Every phase change of a worker goes through ``move`` (with the pool's lock held), which
refuses a move ``_ALLOWED`` does not list. In short::

    LOADING ──▶ IDLE ⇄ BUSY ⇄ DRAINING     (a worker that becomes free goes straight
                        │                   to a waiting request, BUSY, if one waits)
                        ▼
                      WORN ──▶ back to work if its successor did not load
    any but DEAD ──▶ RETIRING ──▶ DEAD      (and any phase may end in DEAD)

``Policy`` decides what the supervisor does about a worker that loaded, failed to load,
died or wore out: replace it now, after a backoff, or recycle it.
"""

from __future__ import annotations

import enum
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from v2mount.pool._state import Worker

__all__ = ["Phase", "Policy", "from_outside", "move"]

_MAX_BACKOFF = 60.0
#: Loading workers killed from outside in a row (no load in between) before such kills
#: count as failed loads too (an OOM killer that strikes every load, say).
_KILLS_BEFORE_BACKOFF = 3
#: Signals that come from outside the model (an operator, a test, the OOM killer).
_OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})


class Phase(enum.Enum):
    LOADING = "loading"
    #: Loaded, waiting for work (in the pool's idle list).
    IDLE = "idle"
    #: Held by a request task, which owns its request channel.
    BUSY = "busy"
    #: A cancelled request's exchange, finished by the supervisor before reuse.
    DRAINING = "draining"
    #: Served enough (or grew too big): out of service until its successor has loaded.
    WORN = "worn"
    #: Told to exit (its request channel ended); killed if it lingers.
    RETIRING = "retiring"
    DEAD = "dead"


_P = Phase
_ALLOWED: dict[Phase, frozenset[Phase]] = {
    _P.LOADING: frozenset({_P.IDLE, _P.BUSY, _P.RETIRING, _P.DEAD}),
    _P.IDLE: frozenset({_P.BUSY, _P.RETIRING, _P.DEAD}),
    _P.BUSY: frozenset({_P.IDLE, _P.DRAINING, _P.WORN, _P.RETIRING, _P.DEAD}),
    _P.DRAINING: frozenset({_P.IDLE, _P.BUSY, _P.WORN, _P.RETIRING, _P.DEAD}),
    _P.WORN: frozenset({_P.IDLE, _P.BUSY, _P.RETIRING, _P.DEAD}),
    _P.RETIRING: frozenset({_P.DEAD}),
    _P.DEAD: frozenset(),
}

#: Phases of a worker that has the model loaded and is alive.
LIVE = frozenset({_P.IDLE, _P.BUSY, _P.DRAINING, _P.WORN})


def move(worker: Worker, phase: Phase) -> None:
    """Change a worker's phase (pool lock held); a move the table forbids is a bug."""
    if phase not in _ALLOWED[worker.phase]:
        raise RuntimeError(f"worker {worker.id}: no move from {worker.phase.name} to {phase.name}")
    worker.phase = phase


def from_outside(exitcode: int | None) -> bool:
    """Whether a signal from outside the model ended the process (not its own doing)."""
    return exitcode is not None and exitcode < 0 and -exitcode in _OUTSIDE_SIGNALS


class Policy:
    """When to replace a worker, how long to back off, and when to recycle one.

    Used by the supervisor thread only.
    """

    def __init__(self, max_requests: int | None, max_memory_mb: float | None) -> None:
        self.max_requests = max_requests
        self.max_memory_mb = max_memory_mb
        #: Loads that failed by themselves since the last successful one.
        self.load_failures = 0
        self._outside_kills = 0

    def loaded(self) -> None:
        self.load_failures = 0
        self._outside_kills = 0

    def load_failed(self) -> None:
        self.load_failures += 1

    def killed_while_loading(self, exitcode: int | None) -> bool:
        """Whether the death of a loading worker counts as a failed load.

        Not when a signal from outside ended it (an operator, a SIGKILL storm): the model
        may load fine. Unless that happens to every load (``_KILLS_BEFORE_BACKOFF`` in a
        row, no load in between: an OOM killer, say), which then backs off too.
        """
        if from_outside(exitcode):
            self._outside_kills += 1
            return self._outside_kills > _KILLS_BEFORE_BACKOFF
        return True

    def backoff(self) -> float:
        """How long a replacement waits while loads fail: 0.5 s, doubling, at most 60 s."""
        if not self.load_failures:
            return 0.0
        return float(min(_MAX_BACKOFF, 0.5 * 2 ** (self.load_failures - 1)))

    def respawn_at(self, worker_loaded: bool) -> float:
        """When the replacement of a worker that ended is due."""
        now = time.monotonic()
        return now if worker_loaded else now + self.backoff()

    def worn_out(self, worker: Worker) -> str | None:
        """Why a healthy worker should be replaced now (gunicorn's ``max_requests``).

        Never while loads fail: a successor would not load either.
        """
        if self.load_failures:
            return None
        if self.max_requests is not None and worker.served >= self.max_requests:
            return f"served {worker.served} requests"
        if self.max_memory_mb is not None:
            resident = worker.process.resident_mb()
            if resident is not None and resident > self.max_memory_mb:
                return f"holds {resident:.0f} MB, more than {self.max_memory_mb:g} MB"
        return None
