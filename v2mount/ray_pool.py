"""``RayPool``: a model's ``parallel_workers`` as Ray actors (``pool_backend: "ray"``).

The same contract as the process pool (``v2mount.runner.Runner``): requests wait in one
bounded queue (``Overloaded`` when it is full) and go to the least-loaded live actor,
which holds at most two (the one it runs and the next, so it never waits a round trip
for work); a dead actor is replaced, the request it was running fails with
``BrokenWorker`` and the one waiting in it goes to another actor; an actor stuck past
``hard_timeout`` is killed. Actors are placed by ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``memory``, ``resources``). Requests and replies travel as
wire tuples holding numpy arrays, so Ray moves the buffers through its object store
(zero-copy for large ones), never as Python lists; nothing goes through Ray Serve.

Threads: the awaiting task submits its own request and reads its own reply; Ray's
completion callbacks only wake it. One supervisor thread per pool owns the lifecycles:
it creates actors, notices deaths (each actor holds a ``watch`` call that fails the moment
it dies), replaces the dead, enforces ``hard_timeout`` and stops the pool. Ray is
imported only when a pool starts; what runs in the actors is ``v2mount.ray_actor``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.to_thread

from v2mount.errors import (
    BrokenWorker,
    InferenceTimeout,
    ModelError,
    ModelNotReady,
    Overloaded,
    V2MountError,
    describe_exception,
)
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool._ipc import error_from_wire
from v2mount.pool._shipping import ModelPackage, pack_model
from v2mount.pool._waiter import Waiter
from v2mount.ray_actor import ModelActor, RequestWire, request_to_wire, response_from_wire
from v2mount.runner import Declared, MetricsSink, RunnerStatistics, apply_metrics
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["RayPool"]

logger = logging.getLogger("v2mount.pool")

#: Seconds a stop lets running requests finish, then waits for the actors' deaths.
STOP_GRACE = 5.0
EXIT_GRACE = 5.0
#: Seconds ``start`` waits for actors Ray cannot place yet before it gives up on them.
PLACEMENT_WAIT = 120.0
_MAX_BACKOFF = 60.0
_TICK = 0.5
#: Requests an actor holds at once: the one it runs and the next, already on its way, so
#: the actor never idles for a round trip. Only the running one fails if it dies.
_PIPELINE = 2

# Phases of a pool.
_NEW, _STARTING, _RUNNING, _STOPPING, _STOPPED = range(5)
# States of a job.
_QUEUED, _SENT, _REPLIED, _DONE = range(4)


class _Actor:
    __slots__ = (
        "dead",
        "handle",
        "id",
        "jobs",
        "killed_for",
        "last_reply",
        "load_failed",
        "loaded",
        "pid",
        "send_lock",
        "sent",
        "watch",
    )

    def __init__(self, actor_id: int, handle: Any) -> None:
        self.id = actor_id
        self.handle = handle
        self.loaded = False
        self.load_failed = False
        self.dead = False
        self.pid: int | None = None
        #: Jobs given to this actor and not finished, at most ``_PIPELINE``.
        self.jobs: list[_Job] = []
        #: Submissions so far: numbers the jobs in the order the actor runs them.
        self.sent = 0
        self.send_lock = threading.Lock()
        self.last_reply = 0.0
        self.killed_for: V2MountError | None = None
        self.watch: Any = None

    def running(self) -> _Job | None:
        """The job the actor is running: the first submitted of those not answered."""
        return _first([job for job in self.jobs if job.state == _SENT])


class _Job:
    __slots__ = (
        "abandoned",
        "actor",
        "future",
        "generation",
        "order",
        "outcome",
        "sent_at",
        "state",
        "waiter",
        "wire",
    )

    def __init__(self, wire: RequestWire) -> None:
        self.wire: RequestWire | None = wire
        self.state = _QUEUED
        self.generation = 0
        self.actor: _Actor | None = None
        self.future: Future[Any] | None = None
        self.outcome: V2MountError | None = None
        self.waiter: Waiter | None = None
        self.abandoned = False
        self.sent_at = 0.0
        self.order: int | None = None

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.fire()


class RayPool:
    """Runs a model in ``workers`` Ray actors (implements ``v2mount.runner.Runner``).

    ``actor_options`` are passed to Ray's ``.options()`` (``num_cpus`` defaults to 1).
    ``address`` is the Ray cluster to join when Ray is not initialised in this process
    yet (``None``: start a local Ray with the dashboard off); a Ray already initialised
    by the host is used as it is. All methods are called from an event loop (asyncio or
    trio); ``metrics_sink`` is called from the pool's threads, so it must be thread-safe.
    """

    def __init__(
        self,
        model: Model,
        workers: int,
        *,
        max_queue_size: int,
        metrics_sink: MetricsSink,
        actor_options: dict[str, Any] | None = None,
        address: str | None = None,
        threads_per_worker: int | None = 1,
        hard_timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a RayPool needs at least one worker")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._model = model
        self._name = model.settings.name
        self._size = workers
        self._max_queue_size = max_queue_size
        self._sink = metrics_sink
        self._options = {"num_cpus": 1, **(actor_options or {})}
        self._address = address
        self._threads = threads_per_worker
        self._hard_timeout = hard_timeout
        self._lock = threading.RLock()
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._queue: deque[_Job] = deque()
        self._actors: dict[int, _Actor] = {}
        self._ids = itertools.count(1)
        self._phase = _NEW
        self._reason = f"model {self._name!r} is not started"
        self._start_waiter: Waiter | None = None
        self._start_ok = False
        #: What the model's ``load`` declared in the first actor that loaded, for ``start``.
        self._declared: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self._initial: set[int] = set()
        self._stop_waiters: list[Waiter] = []
        self._actor_class: Any = None
        self._package: ModelPackage | None = None
        self._failures = 0
        self._next_spawn = 0.0
        self._supervised = False

    # -- the Runner contract (event loop) ----------------------------------------------

    @property
    def ready(self) -> bool:
        """True while at least one actor is alive with the model loaded."""
        with self._lock:
            return self._phase in (_STARTING, _RUNNING) and self._live() > 0

    @property
    def reason(self) -> str | None:
        with self._lock:
            return None if self._phase in (_STARTING, _RUNNING) and self._live() else self._reason

    async def start(self) -> Declared | None:
        """Connect to Ray, create the actors, wait until each has loaded or failed to.

        Returns what the model's ``load`` declared in an actor (``None`` if nothing), for
        the caller to serve as metadata; the model's settings are left as they were.
        Raises ``ModelNotReady`` with the load error when no actor loaded. Cancelling
        ``start`` stops the pool.
        """
        with self._lock:
            if self._phase != _NEW:
                raise RuntimeError("a RayPool can be started only once")
            self._phase = _STARTING
            self._reason = f"model {self._name!r} is loading"
            waiter = self._start_waiter = Waiter()
        try:
            self._package = pack_model(self._model)
            await anyio.to_thread.run_sync(self._connect)
            self._supervised = True
            threading.Thread(
                target=self._supervise, name=f"v2mount-ray-pool-{self._name}", daemon=True
            ).start()
            await waiter.wait()
        except BaseException as exc:
            with self._lock:
                if isinstance(exc, V2MountError):
                    self._reason = exc.message
                elif isinstance(exc, Exception):
                    self._reason = f"model {self._name!r}: Ray pool failed to start: {exc}"
                reason = self._reason
            await self.stop()
            if isinstance(exc, Exception):
                raise ModelNotReady(reason) from exc
            raise
        if not self._start_ok:
            reason = self._reason
            await self.stop()
            raise ModelNotReady(reason)
        return None if self._declared is None else Declared.from_wire(*self._declared)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Answer one request in an actor.

        Raises ``Overloaded`` when ``max_queue_size`` requests already wait,
        ``ModelNotReady`` when no actor is alive, ``BrokenWorker`` when the actor died
        while running this request, ``InferenceTimeout`` when it was killed past
        ``hard_timeout``, ``ModelError`` (or the model's own ``V2MountError``) when
        predict raised. Cancellation withdraws a queued request; a running one finishes
        in its actor and its result is dropped.
        """
        job = _Job(request_to_wire(request))
        with self._lock:
            if self._phase not in (_STARTING, _RUNNING) or not self._live():
                raise ModelNotReady(self._reason)
            waiting = len(self._queue)
            if waiting >= self._max_queue_size:
                raise Overloaded(
                    f"model {self._name!r} has {waiting} requests waiting for a worker"
                )
            self._queue.append(job)
            sends = self._dispatch()
        self._send(sends)
        while True:
            waiter = Waiter()
            with self._lock:
                job.waiter = waiter
                if job.outcome is not None:
                    raise job.outcome
                future = job.future if job.state == _REPLIED else None
            if future is not None:
                reply = self._finish(job, future)
                if reply is not None:
                    return self._outcome(reply)
                continue  # the actor died: the job has an outcome or waits for another
            try:
                await waiter.wait()
            except BaseException:
                self._abandon(job)
                raise

    async def stop(self) -> None:
        """Stop every actor; idempotent, shielded from cancellation.

        Queued requests fail with ``ModelNotReady``; running ones get ``STOP_GRACE``
        seconds to finish, then every actor is killed and its death awaited.
        """
        with anyio.CancelScope(shield=True):
            waiter = Waiter()
            with self._lock:
                if self._phase == _NEW or not self._supervised:
                    self._phase = _STOPPED
                    self._reason = f"model {self._name!r} is stopped"
                if self._phase == _STOPPED:
                    return
                self._stop_waiters.append(waiter)
                dropped = self._begin_stop()
            for job in dropped:
                job.wake()
            self._events.put(("stop",))
            await waiter.wait()

    def statistics(self) -> RunnerStatistics:
        with self._lock:
            running = sum(len(a.jobs) for a in self._actors.values())
            return RunnerStatistics(
                workers=self._size,
                live_workers=self._live(),
                queued=len(self._queue),
                in_flight=len(self._queue) + running,
                max_queue_size=self._max_queue_size,
            )

    def pids(self) -> list[int]:
        """Process ids of the actors currently alive with the model loaded."""
        with self._lock:
            return [a.pid for a in self._actors.values() if a.pid is not None and not a.dead]

    # -- the request path (under the lock unless said otherwise) -----------------------

    def _live(self) -> int:
        return sum(1 for a in self._actors.values() if a.loaded and not a.dead)

    def _least_loaded(self) -> _Actor | None:
        """A live actor with the fewest jobs, if it has room for one more."""
        best = None
        for actor in self._actors.values():
            if actor.loaded and not actor.dead and len(actor.jobs) < _PIPELINE:
                if best is None or len(actor.jobs) < len(best.jobs):
                    best = actor
        return best

    def _dispatch(self) -> list[tuple[_Actor, _Job, int]]:
        """Give queued jobs to actors; the caller sends them once the lock is released."""
        sends = []
        while self._queue and self._phase in (_STARTING, _RUNNING):
            actor = self._least_loaded()
            if actor is None:
                break
            job = self._queue.popleft()
            job.state, job.actor, job.future, job.order = _SENT, actor, None, None
            job.generation += 1
            job.sent_at = time.monotonic()
            actor.jobs.append(job)
            sends.append((actor, job, job.generation))
            job.wake()
        return sends

    def _send(self, sends: list[tuple[_Actor, _Job, int]]) -> None:
        """Submit jobs to their actors (state lock not held: Ray may call back at once).

        The actor's send lock makes the numbering of its jobs the order of submission,
        which is the order a Ray actor runs one caller's calls in.
        """
        for actor, job, generation in sends:
            with actor.send_lock:
                try:
                    ref: Any = actor.handle.predict.remote(job.wire)
                except Exception as exc:
                    ref = exc
                with self._lock:
                    if job.generation == generation:
                        actor.sent += 1
                        job.order = actor.sent
            if isinstance(ref, Exception):
                future: Future[Any] = Future()
                future.set_exception(ref)
            else:
                future = ref.future()
            future.add_done_callback(functools.partial(self._on_reply, job, generation))

    def _on_reply(self, job: _Job, generation: int, future: Future[Any]) -> None:
        """Called in a Ray thread (or the submitting one): wake the job's task."""
        with self._lock:
            if job.generation != generation or job.state != _SENT:
                return
            job.state, job.future = _REPLIED, future
            abandoned = job.abandoned
        if abandoned:
            self._events.put(("reply", job, future))
        else:
            job.wake()

    def _finish(self, job: _Job, future: Future[Any]) -> tuple[Any, ...] | None:
        """The actor's reply to ``job``, its slot freed; ``None`` if the actor died."""
        error = future.exception()
        if error is not None and _is_death(error):
            self._actor_died(job.actor)
            with self._lock:
                if job.state == _REPLIED and job.outcome is None:  # never left unanswered
                    job.state, job.outcome = _DONE, self._broken()
            return None
        with self._lock:
            actor = job.actor
            if actor is not None and job in actor.jobs:
                actor.jobs.remove(job)
                actor.last_reply = time.monotonic()
            job.state, job.wire = _DONE, None
            sends = self._dispatch()
        self._send(sends)
        if error is not None:
            return ("error", (ModelError.__name__, describe_exception(error), None), [])
        reply: tuple[Any, ...] = future.result()
        return reply

    def _outcome(self, reply: tuple[Any, ...]) -> InferenceResponse:
        kind, payload, updates = reply
        self._apply_metrics(updates)
        if kind == "result":
            return response_from_wire(payload)
        raise error_from_wire(payload)

    def _abandon(self, job: _Job) -> None:
        """The caller gave up (lock not held): withdraw a queued job, drop a running one's."""
        with self._lock:
            if job.state == _QUEUED:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.state = _DONE
                return
            job.abandoned = True
            future = job.future if job.state == _REPLIED else None
        if future is not None:
            self._finish(job, future)

    def _actor_died(self, actor: _Actor | None) -> None:
        """Note a death (lock not held; not in a Ray thread): fail the request it was
        running, give the others it held to other actors, tell the supervisor."""
        if actor is None:
            return
        with self._lock:
            if actor.dead:
                return
            actor.dead = True
            unanswered = [
                job
                for job in actor.jobs
                if job.state == _SENT
                or (job.state == _REPLIED and job.future is not None and _died(job.future))
            ]
            running = _first(unanswered)
            actor.jobs = []
            requeue = []
            for job in unanswered:
                if job is running or job.abandoned or self._phase not in (_STARTING, _RUNNING):
                    job.state = _DONE
                    job.outcome = actor.killed_for or self._broken()
                else:  # it never started: another actor runs it
                    job.state, job.actor, job.future = _QUEUED, None, None
                    job.generation += 1
                    requeue.append(job)
            self._queue.extendleft(reversed(requeue))
            sends = self._dispatch()
            if not self._live() and self._phase == _RUNNING:
                self._reason = f"model {self._name!r}: every Ray actor died; replacing them"
        for job in unanswered:
            job.wake()
        self._send(sends)
        self._events.put(("died", actor))

    def _broken(self) -> BrokenWorker:
        return BrokenWorker(f"model {self._name!r}: its Ray actor died while running this request")

    def _apply_metrics(self, updates: list[MetricUpdate]) -> None:
        apply_metrics(self._sink, updates, self._name, logger)

    def _begin_stop(self) -> list[_Job]:
        """Enter the stopping phase (lock held); returns the queued jobs, failed."""
        if self._phase == _STOPPING:
            return []
        self._phase = _STOPPING
        self._reason = f"model {self._name!r} is stopping"
        dropped = list(self._queue)
        self._queue.clear()
        for job in dropped:
            job.state = _DONE
            job.outcome = ModelNotReady(f"model {self._name!r} is stopping")
        return dropped

    # -- the supervisor thread ---------------------------------------------------------

    def _connect(self) -> None:
        """Called in a worker thread: join (or start) Ray, and define the actor class."""
        try:
            import ray
        except ImportError:
            raise ModelNotReady(
                f"model {self._name!r} has pool_backend 'ray', but Ray is not installed "
                "(pip install 'v2mount[ray]')"
            ) from None
        if not ray.is_initialized():
            ray.init(address=self._address, include_dashboard=False, log_to_driver=True)
        # Its own concurrency group lets ``watch`` wait beside the one predict at a time.
        remote: Any = ray.remote
        self._actor_class = remote(
            concurrency_groups={"watch": 1}, max_restarts=0, max_task_retries=0
        )(ModelActor)

    def _supervise(self) -> None:
        try:
            for _ in range(self._size):
                self._spawn(initial=True)
            self._settle_start()
            started = time.monotonic()
            while True:
                try:
                    event = self._events.get(timeout=_TICK)
                except queue.Empty:
                    event = ("tick",)
                if event[0] == "stop":
                    break
                self._on_event(event)
                if self._start_waiter is not None and time.monotonic() - started > PLACEMENT_WAIT:
                    self._settle_start(give_up=True)
                self._on_timers()
        except BaseException:
            logger.exception("the Ray pool of model %r failed", self._name)
            with self._lock:
                self._reason = f"model {self._name!r}: its Ray pool failed"
                dropped = self._begin_stop()
            for job in dropped:
                job.wake()
        finally:
            self._shutdown()

    def _spawn(self, initial: bool = False) -> None:
        """Create one actor and ask it to load (lock not held: Ray may call back at once)."""
        try:
            handle = self._actor_class.options(**self._options).remote(self._package, self._threads)
            load = handle.load.remote().future()
            watch = handle.watch.options(concurrency_group="watch").remote().future()
        except Exception as exc:
            with self._lock:
                self._reason = f"model {self._name!r}: cannot create a Ray actor: {exc}"
                self._failures += 1
            return
        actor = _Actor(next(self._ids), handle)
        actor.watch = watch
        with self._lock:
            self._actors[actor.id] = actor
            if initial:
                self._initial.add(actor.id)
        load.add_done_callback(lambda f: self._events.put(("loaded", actor, f)))
        # Not handled in Ray's thread: a death resubmits jobs, which calls into Ray.
        watch.add_done_callback(lambda f: self._events.put(("watch", actor)))

    def _on_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "loaded":
            self._on_loaded(event[1], event[2])
        elif kind == "died":
            actor: _Actor = event[1]
            with self._lock:
                self._actors.pop(actor.id, None)
                self._initial.discard(actor.id)
                if not actor.loaded:
                    self._failures += 1
                    if not actor.load_failed:
                        self._reason = f"model {self._name!r}: its Ray actor died while loading"
            self._settle_start()
        elif kind == "watch":
            self._actor_died(event[1])
        elif kind == "reply":
            self._finish(event[1], event[2])

    def _on_loaded(self, actor: _Actor, future: Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            if not _is_death(error):
                with self._lock:
                    actor.load_failed = True
                    self._reason = (
                        f"model {self._name!r} failed to load: {describe_exception(error)}"
                    )
            self._kill(actor)
            return
        message: tuple[Any, ...] = future.result()
        if message[0] == "load_failed":
            _, text, updates = message
            self._apply_metrics(updates)
            with self._lock:
                actor.load_failed = True
                self._reason = f"model {self._name!r} failed to load: {text}"
            self._kill(actor)
            return
        _, updates, declared, pid = message
        self._apply_metrics(updates)
        with self._lock:
            if declared is not None and not self._start_ok:
                self._declared = declared
            if actor.dead:
                return
            actor.loaded, actor.pid = True, pid
            self._initial.discard(actor.id)
            self._start_ok = True
            self._failures = 0
            sends = self._dispatch()
        self._send(sends)
        self._settle_start()

    def _kill(self, actor: _Actor) -> None:
        """Kill an actor; its death comes back through its watch call."""
        import ray

        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:
            self._actor_died(actor)

    def _settle_start(self, give_up: bool = False) -> None:
        """Wake ``start`` once every initial actor loaded or failed (or ``give_up``)."""
        with self._lock:
            waiter = self._start_waiter
            if waiter is None or (self._initial and not give_up):
                return
            if give_up and not self._start_ok:
                self._reason = (
                    f"model {self._name!r}: Ray could not place its actors within "
                    f"{PLACEMENT_WAIT:g} s (ray_actor_options {self._options})"
                )
            self._start_waiter = None
            if self._start_ok and self._phase == _STARTING:
                self._phase = _RUNNING
        waiter.fire()

    def _on_timers(self) -> None:
        now = time.monotonic()
        stuck = []
        with self._lock:
            if self._phase != _RUNNING:
                return
            if self._hard_timeout is not None:
                for actor in self._actors.values():
                    job = actor.running()
                    if job is not None and actor.killed_for is None:
                        # It started when sent, or when the one before it was answered.
                        if now - max(job.sent_at, actor.last_reply) > self._hard_timeout:
                            actor.killed_for = InferenceTimeout(
                                f"model {self._name!r} ran longer than {self._hard_timeout:g} s; "
                                "its Ray actor was killed"
                            )
                            stuck.append(actor)
            missing = self._size - len(self._actors) if now >= self._next_spawn else 0
            if missing > 0 and self._failures:
                self._next_spawn = now + min(_MAX_BACKOFF, 2 ** min(self._failures, 6))
        for _ in range(missing):
            self._spawn()
        for actor in stuck:
            logger.error("model %r: a request ran past the hard timeout", self._name)
            self._kill(actor)

    def _shutdown(self) -> None:
        """Let running requests finish, kill every actor, await their deaths."""
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            with self._lock:
                if not any(a.jobs for a in self._actors.values()):
                    break
            try:
                event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event[0] in ("reply", "loaded", "died", "watch"):
                self._on_event(event)
        with self._lock:
            actors = list(self._actors.values())
            for actor in actors:
                actor.killed_for = ModelNotReady(f"model {self._name!r} is stopping")
        for actor in actors:
            self._kill(actor)
        deadline = time.monotonic() + EXIT_GRACE
        for actor in actors:
            watch = actor.watch
            if watch is not None:
                try:
                    watch.exception(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:
                    logger.warning("model %r: a Ray actor did not confirm its death", self._name)
        with self._lock:
            self._actors.clear()
            self._phase = _STOPPED
            self._reason = f"model {self._name!r} is stopped"
            waiters, self._stop_waiters = self._stop_waiters, []
            start_waiter, self._start_waiter = self._start_waiter, None
        for actor in actors:
            self._actor_died(actor)  # their running jobs, if any, get an answer
        for waiter in waiters:
            waiter.fire()
        if start_waiter is not None:
            start_waiter.fire()


def _first(jobs: list[_Job]) -> _Job | None:
    """Of jobs sent to one actor, the one submitted first (the one it runs first)."""
    submitted = [job for job in jobs if job.order is not None]
    return min(submitted, key=lambda job: job.order or 0) if submitted else None


def _died(future: Future[Any]) -> bool:
    error = future.exception()
    return error is not None and _is_death(error)


def _is_death(error: BaseException) -> bool:
    """Whether a call failed because its actor is dead (or Ray itself went away)."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)
