"""When a batch goes: the scheduling core, pure and synchronous, with time passed in.

The async batcher (``_predictive``) calls ``poll`` after every event — an arrival, a
batch finished, a timer — and sends what it returns; tests drive the same core with a
simulated clock. Nothing here sleeps, reads a clock or touches an event loop.

A batch goes only when a worker is free (at most ``capacity()`` batches in flight), and
then, by reason:

- **full**: it holds ``max_batch_size`` rows (in the predictive mode, fewer if a batch
  that large could not meet the SLO at all), or the next request would not fit;
- **deadline**: its oldest request can wait no longer: it has waited ``max_wait``
  (``max_batch_time`` in the fixed window), or, in the predictive mode (``Policy.slo``
  set), the batch would end after the oldest request's deadline less the guard if it
  did not go now — typically because it was held up waiting for a worker;
- **idle**: it goes before then because waiting would not pay. In the predictive mode:
  waiting one expected gap for one more request (``ArrivalRate``) would end the batch
  past the oldest's deadline less the guard (``now + gap + L(n + r) + guard >
  deadline``); or the batch is already large enough for the workers to keep up with the
  arrival rate at ``TARGET_LOAD`` (``_enough_gap``), so waiting would only add latency; or
  the cost model is still cold. In the fixed window with ``idle_dispatch``: the next
  request is not expected before ``max_wait`` runs out.

Otherwise the scheduler asks to be polled again when the first of those comes due (or
at the next arrival).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from v2mount.batching._cost import CostFit, CostModel
from v2mount.batching._rate import ArrivalRate
from v2mount.errors import Overloaded

__all__ = ["REASONS", "Dispatch", "Entry", "Policy", "Reason", "Scheduler", "Tally"]

T = TypeVar("T")
Reason = Literal["full", "deadline", "idle"]
REASONS: tuple[Reason, ...] = ("full", "deadline", "idle")
#: The busy share of the workers that batches are sized for (``Scheduler._enough_gap``).
TARGET_LOAD = 0.8


@dataclass(frozen=True, slots=True)
class Policy:
    """What the scheduler aims for; times in seconds.

    ``slo`` set: predictive mode, each request's deadline is its arrival plus ``slo``.
    ``max_wait``: the longest the oldest request of a batch waits for company.
    ``admission``: refuse at once (``Overloaded``) a request predicted to miss its
    deadline (predictive mode only). ``max_queue``: requests that may wait in all.
    """

    max_batch_size: int
    max_wait: float = math.inf
    slo: float | None = None
    admission: bool = True
    idle_dispatch: bool = True
    max_queue: int = 1024

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {self.max_batch_size}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must not be negative, not {self.max_wait}")
        if self.slo is not None and self.slo <= 0:
            raise ValueError(f"slo must be positive, not {self.slo}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {self.max_queue}")


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    """One waiting request: the caller's ``item``, its rows, arrival and deadline."""

    key: Hashable
    item: T
    rows: int
    arrived: float
    deadline: float


@dataclass(eq=False, slots=True)
class Dispatch(Generic[T]):
    """A batch to send now; hand it back to ``finished`` when the runner answered."""

    entries: list[Entry[T]]
    rows: int
    reason: Reason
    sent: float
    predicted: float = 0.0  # when it is expected to finish, for admission


@dataclass(slots=True)
class Tally:
    """Running totals, shareable by the schedulers of one batcher (one per event loop)."""

    dispatched: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    batched_requests: int = 0
    refused: int = 0
    slo_misses: int = 0


@dataclass(eq=False, slots=True)
class _Queue(Generic[T]):
    entries: deque[Entry[T]] = field(default_factory=deque)
    rows: int = 0


class Scheduler(Generic[T]):
    """Queues by compatibility key, the batches in flight, and the decision when to send.

    ``cost`` and ``rate`` may be shared with other schedulers (one per event loop);
    ``capacity()`` says how many batches may run at once (the runner's live workers).
    Not thread-safe: the caller holds a lock.
    """

    def __init__(
        self,
        policy: Policy,
        cost: CostModel,
        rate: ArrivalRate,
        capacity: Callable[[], int],
        tally: Tally | None = None,
    ) -> None:
        self.policy = policy
        self._cost = cost
        self._rate = rate
        self._capacity = capacity
        self._queues: dict[Hashable, _Queue[T]] = {}
        self._in_flight: set[Dispatch[T]] = set()
        self.tally = tally if tally is not None else Tally()
        self.queued_requests = 0
        self.queued_rows = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        return not self._queues and not self._in_flight

    def add(self, key: Hashable, item: T, rows: int, now: float) -> Entry[T]:
        """Queue a request, or raise ``Overloaded`` when it should not wait at all."""
        policy = self.policy
        self._rate.arrive(now, rows)  # the offered rate: refused requests count too
        if self.queued_requests >= policy.max_queue:
            self.tally.refused += 1
            raise Overloaded(f"{self.queued_requests} requests are waiting to be batched")
        fit = self._cost.fit() if policy.slo is not None else None
        capacity = self._capacity()
        if fit is not None and policy.admission and not self._startable(capacity):
            assert policy.slo is not None
            late = self._finish(rows, now, fit, capacity) - (now + policy.slo)
            if late > 0:
                self.tally.refused += 1
                raise Overloaded(
                    f"a request now would be answered about {1000 * late:.0f} ms after its"
                    f" {1000 * policy.slo:g} ms latency target",
                    retry_after=max(1, math.ceil(late)),
                )
        deadline = math.inf if policy.slo is None else now + policy.slo
        entry = Entry(key, item, rows, now, deadline)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.entries.append(entry)
        queue.rows += rows
        self.queued_requests += 1
        self.queued_rows += rows
        return entry

    def remove(self, entry: Entry[T]) -> bool:
        """Take a cancelled request out; ``False`` if its batch already went."""
        queue = self._queues.get(entry.key)
        if queue is None or entry not in queue.entries:
            return False
        queue.entries.remove(entry)
        queue.rows -= entry.rows
        self.queued_requests -= 1
        self.queued_rows -= entry.rows
        if not queue.entries:
            del self._queues[entry.key]
        return True

    def poll(self, now: float) -> tuple[list[Dispatch[T]], float]:
        """The batches to send now, and when to poll again (``inf``: on the next event)."""
        sent: list[Dispatch[T]] = []
        wake = math.inf
        capacity = self._capacity()
        free = capacity - len(self._in_flight)
        fit = self._cost.fit()
        limit = self._limit(fit)
        for key, queue in sorted(self._queues.items(), key=lambda kv: kv[1].entries[0].arrived):
            while queue.entries:
                head = queue.entries[0]
                if free <= 0:
                    break
                count, rows = self._fitting(queue, limit)
                if rows >= limit or count < len(queue.entries):
                    reason: Reason = "full"
                else:
                    due, reason = self._due(head, rows, now, fit, capacity)
                    if due > now:
                        wake = min(wake, due)
                        break
                entries = [queue.entries.popleft() for _ in range(count)]
                queue.rows -= rows
                self.queued_requests -= count
                self.queued_rows -= rows
                predicted = now if fit is None else now + fit.cost(rows)
                dispatch = Dispatch(entries, rows, reason, now, predicted)
                self._in_flight.add(dispatch)
                self.tally.dispatched[reason] += 1
                self.tally.batched_requests += count
                sent.append(dispatch)
                free -= 1
            if not queue.entries:
                del self._queues[key]
        return sent, wake

    def finished(self, dispatch: Dispatch[T], now: float, ok: bool, waited: float = 0.0) -> None:
        """A batch came back; ``ok``: it was answered, so its time is a cost sample and
        its requests answered after their deadline count as SLO misses. ``waited``: the
        seconds it waited for a worker after it was sent (a pool whose workers also run
        other calls, such as a model's stages), which are not its cost."""
        self._in_flight.discard(dispatch)
        if ok:
            self._cost.record(dispatch.rows, max(0.0, now - dispatch.sent - waited))
            self.tally.slo_misses += sum(now > entry.deadline for entry in dispatch.entries)

    def _startable(self, capacity: int) -> bool:
        """Nothing queued and a worker free: a request would start at once, as fast as it
        ever could, so it is never refused (and the cost model keeps learning even when
        its guard says no SLO can be met)."""
        return not self._queues and len(self._in_flight) < capacity

    def _limit(self, fit: CostFit | None) -> int:
        """Rows in a full batch: ``max_batch_size``, or fewer when a batch that large
        could not finish within the SLO even if it went at once (predictive mode)."""
        size, slo = self.policy.max_batch_size, self.policy.slo
        if slo is None or fit is None or fit.per_row <= 0:
            return size
        return max(1, min(size, math.floor((slo - fit.guard - fit.intercept) / fit.per_row)))

    def _fitting(self, queue: _Queue[T], limit: int) -> tuple[int, int]:
        """How many requests from the head fit in one batch, and their rows.

        The head always fits: a request of more rows than ``limit`` (but fewer than
        ``max_batch_size``) goes alone.
        """
        count = rows = 0
        for entry in queue.entries:
            if count and rows + entry.rows > limit:
                break
            count += 1
            rows += entry.rows
        return count, rows

    def _due(
        self, head: Entry[T], rows: int, now: float, fit: CostFit | None, capacity: int
    ) -> tuple[float, Reason]:
        """When a batch of ``rows`` led by ``head`` goes, and why (if that is now).

        The moments that depend on the arrival rate account for the silence since the
        last arrival, which makes the next one look further away as it lasts.
        """
        policy = self.policy
        if policy.slo is None:
            latest = head.arrived + policy.max_wait
            early = self._rate.last_moment(latest) if policy.idle_dispatch else latest
        elif fit is None:
            return now, "idle"
        else:
            latest = min(head.arrived + policy.max_wait, head.deadline - fit.guard - fit.cost(rows))
            more = min(rows + self._rate.rows, self._limit(fit))
            one_more = self._rate.last_moment(head.deadline - fit.guard - fit.cost(more))
            enough = self._enough_gap(rows, fit, capacity)
            early = min(one_more, self._rate.quiet_from(enough))
        if latest <= now:
            return now, "deadline"
        if early <= now:
            return now, "idle"
        return min(latest, early), "idle"

    def _enough_gap(self, rows: int, fit: CostFit, capacity: int) -> float:
        """The gap between requests from which a batch of ``rows`` need not wait for more.

        Batches of ``n`` rows serve ``workers·n / L(n)`` rows a second; while the arrivals
        bring less than ``TARGET_LOAD`` of that, waiting for a bigger batch only adds
        latency. (Smaller batches wait, as the SLO allows, so that the workers are not
        spent on tiny batches while requests pile up.)
        """
        cost = fit.cost(rows)
        if cost <= 0:
            return 0.0
        sustained = TARGET_LOAD * capacity * rows / cost  # rows a second
        return self._rate.rows / sustained

    def _finish(self, rows: int, now: float, fit: CostFit, capacity: int) -> float:
        """When a request of ``rows`` arriving now is expected to be answered, with margin.

        The rows queued ahead go first, in full batches, each on the worker that frees
        first (a batch in flight ends when its cost says). The request's own batch holds
        the rows ahead of it in that batch, itself, and the rows that arrive until a
        worker takes it (at the offered rate, refused requests included: under overload
        the batch fills). Every batch that runs one after the other before the answer
        adds a guard.
        """
        size = self._limit(fit)
        frees = [(max(now, dispatch.predicted), 1) for dispatch in self._in_flight]
        frees += [(now, 0)] * max(0, capacity - len(frees))
        if not frees:
            frees = [(now, 0)]
        heapq.heapify(frees)
        full, rest = divmod(self.queued_rows, size)
        if rest + rows > size:
            full, rest = full + 1, 0
        full_cost = fit.cost(size)
        for _ in range(full):
            free, depth = frees[0]
            heapq.heapreplace(frees, (free + full_cost, depth + 1))
        start, depth = frees[0]
        gap = self._rate.gap(now)
        joining = 0.0 if math.isinf(gap) else self._rate.rows / gap * (start - now)
        own = min(size, rest + rows + joining)
        return start + fit.cost(own) + fit.guard * (depth + 1)
