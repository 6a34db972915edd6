"""The worker process: everything here is called in the child.

A worker limits native thread pools, unpickles its models (dill bytes made by the
parent; one model, or every model of a shared pool, each in its own *slot*), loads each
once, creates its shared-memory arena, then answers one framed request at a time (for the
model of the frame's slot) until its request channel reaches EOF (the pool closed it, or
the parent died). Its stdout and stderr are the pool's pipes; its log records, a
``Ready`` or ``LoadFailed`` per model, then ``Serving``, travel on the control pipe. A
worker none of whose models loaded exits. Models that join or leave a running shared
pool are loaded and dropped by a control thread (``Load``, ``Unload``) while the main
thread serves the others. It removes its arena when it exits, and exits by itself when
orphaned, so even a SIGKILLed parent leaves no process and no shared memory behind.

A worker starts one of two ways: spawned (``worker_main``: a fresh interpreter that
unpickles the model itself), or forked from the pool's template process
(``forked_worker_main``: the template has imported everything and unpickled the model
already, see ``_template.py``). From ``load`` on, both are the same.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import io
import logging
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import multiprocess
from multiprocess.connection import Connection

from v2mount.errors import ModelNotReady, V2MountError, describe_exception
from v2mount.model import MethodRunner, Model, build_response
from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._ipc import (
    REQUEST,
    Channel,
    DeclaredSpecs,
    Load,
    LoadFailed,
    Log,
    Ready,
    Serving,
    Unload,
    Unloaded,
    decode_request,
    encode_error,
    encode_result,
    frame_kind,
    frame_route,
)
from v2mount.pool._shipping import ModelPackage, unpack_model
from v2mount.pool._stage_frames import answer_stage

__all__ = [
    "THREAD_VARIABLES",
    "WORKER_NAME",
    "WorkerSpec",
    "forked_worker_main",
    "limit_threads",
    "name_process",
    "parent_pidfd",
    "worker_main",
]

#: Environment variables that size native thread pools, set in the worker only.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: What ``ps`` and ``/proc/<pid>/comm`` call a worker process (Linux).
WORKER_NAME = "v2mount-worker"
_ORPHAN_CHECK_SECONDS = 1.0

logger = logging.getLogger("v2mount.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides its pipes and the model bytes.

    ``slots``: the models it loads before it serves. Sent to the template as JSON
    (``dataclasses.asdict``): plain fields only.
    """

    worker_id: int
    slots: tuple[int, ...]
    parent_pid: int
    arena_path: str | None
    shm_threshold: int
    threads: int | None
    log_level: int


class _Events:
    """The worker's end of the control pipe; sends are locked (log records come from any thread)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Ready | LoadFailed | Serving | Unloaded | Log) -> None:
        with self._lock:
            self.conn.send(message)


class _ForwardHandler(logging.Handler):
    """Sends each log record of the worker to the parent as a ``Log`` message."""

    def __init__(self, events: _Events) -> None:
        super().__init__()
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
            self._events.send(Log(record.levelno, record.name, text))
        except (OSError, EOFError):
            pass  # the parent is gone or closed the pipe: nobody to tell
        except Exception:
            self.handleError(record)


def limit_threads(threads: int | None) -> None:
    """Size native thread pools: environment for libraries loaded later, threadpoolctl now."""
    if threads is None:
        return
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads)


def name_process(name: str) -> None:
    """Give this process a name ``ps`` shows (Linux; at most 15 characters are kept)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass


def parent_pidfd(parent_pid: int) -> int | None:
    """A pidfd of ``parent_pid``, this process's parent; ``None`` without pidfds (not
    Linux 5.3+) or when the parent is gone already (``getppid`` then differs)."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(parent_pid)
    except OSError:
        return None
    if os.getppid() != parent_pid:  # the fd may be of whoever took the pid since
        os.close(fd)
        return None
    return fd


def _watch_parent(parent_pid: int, parent_fd: int | None, arena_path: str | None) -> None:
    """Exit if the parent died while this worker was busy (its pipe EOF comes only when idle).

    ``parent_fd`` is a pidfd of the parent (a forked worker inherits the template's), which
    fires at once; without one, the parent is polled every second.
    """
    if parent_fd is None:
        while os.getppid() == parent_pid:
            time.sleep(_ORPHAN_CHECK_SECONDS)
    else:
        select.select([parent_fd], [], [])
    if arena_path is not None:
        unlink_quietly(arena_path)
    os._exit(0)


class _Loaded:
    """A model this worker serves; ``lock`` is held while it runs (an unload waits)."""

    __slots__ = ("lock", "runner")

    def __init__(self, runner: MethodRunner) -> None:
        self.runner = runner
        self.lock = threading.Lock()


def _answer(
    models: Mapping[int, _Loaded], frame: bytearray, arena: Arena | None, threshold: int
) -> bytes:
    """The reply frame to one call frame, by the model of its slot (which an unload waits
    for): its result or its error, with the metrics."""
    slot, seq = frame_route(frame)
    loaded = models.get(slot)
    if loaded is None:
        return encode_error(ModelNotReady(f"model slot {slot} is not loaded here"), seq, [])
    with loaded.lock:
        if frame_kind(frame) != REQUEST:
            return answer_stage(loaded.runner, frame, arena, threshold)
        return _predict(loaded.runner, frame, arena, threshold)


def _predict(runner: MethodRunner, frame: bytearray, arena: Arena | None, threshold: int) -> bytes:
    """The reply frame to one request frame: its result or its error, with the metrics."""
    model = runner.model
    seq = -1
    try:
        seq, request = decode_request(frame, arena)
        response = build_response(model, request, runner.run(model.predict, request))
        del request
        return encode_result(response, seq, model.metrics.drain(), arena, threshold)
    except Exception as exc:
        if not isinstance(exc, V2MountError):
            logger.exception("predict raised")
        return encode_error(exc, seq, model.metrics.drain())


def _serve(
    channel: Channel, models: Mapping[int, _Loaded], arena: Arena | None, threshold: int
) -> None:
    """Answer requests one at a time until the channel reaches EOF.

    Each frame is dropped as soon as it is used, so an idle worker holds no tensor.
    """
    while True:
        try:
            frame = channel.receive()
        except (EOFError, OSError):
            return
        reply = _answer(models, frame, arena, threshold)
        del frame
        try:
            channel.send(reply)
        except OSError:
            return
        del reply


def _load(
    slot: int, obtain: Callable[[], Model], control: _Events, models: dict[int, _Loaded]
) -> bool:
    """Load one model into ``slot`` and report how it went; ``True`` if it serves now."""
    runner: MethodRunner | None = None
    try:
        model = obtain()
        runner = MethodRunner(model)
        declared = DeclaredSpecs.of(model.settings)
        runner.run(model.load)
    except Exception as exc:
        drained = runner.model.metrics.drain() if runner is not None else []
        if runner is not None:
            runner.close()
        failed = LoadFailed(slot, describe_exception(exc), drained, traceback.format_exc())
        with contextlib.suppress(OSError):
            control.send(failed)
        return False
    models[slot] = _Loaded(runner)
    # What load declared (an ONNX graph's inputs, say) is metadata the parent serves.
    changed = DeclaredSpecs.of(model.settings)
    with contextlib.suppress(OSError):
        control.send(Ready(slot, model.metrics.drain(), changed if changed != declared else None))
    return True


def _unload(slot: int, models: dict[int, _Loaded]) -> bool | None:
    """Drop the model of ``slot`` (after its running request, if any); whether it is freed."""
    loaded = models.pop(slot, None)
    if loaded is None:
        return True
    with loaded.lock:
        loaded.runner.close()
    try:
        gone = weakref.ref(loaded.runner.model)
    except TypeError:  # a model class with __slots__ and no __weakref__
        gone = None
    del loaded
    gc.collect()
    return None if gone is None else gone() is None


def _follow(
    events: Connection, control: _Events, models: dict[int, _Loaded], serving: threading.Event
) -> None:
    """The control thread: once the worker serves, load and drop the models the parent
    sends, in order, until the pipe ends.

    A reader thread takes commands off the pipe at once, so the parent never waits on
    a worker that is still loading its first models.
    """
    commands: queue.SimpleQueue[Load | Unload | None] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                commands.put(events.recv())
            except (EOFError, OSError):
                commands.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    serving.wait()
    while (command := commands.get()) is not None:
        if isinstance(command, Load):
            package = command.package
            _load(command.slot, functools.partial(unpack_model, package), control, models)
        else:
            freed = _unload(command.slot, models)
            with contextlib.suppress(OSError):
                control.send(Unloaded(command.slot, freed))


def worker_main(
    conn: Connection,
    events: Connection,
    stdout: Connection,
    stderr: Connection,
    packages: Mapping[int, ModelPackage],
    spec: WorkerSpec,
) -> None:
    """Entry point of a spawned worker process (called in the child).

    ``conn``: the request channel (frames of ``_ipc``); ``events``: the control pipe;
    ``packages``: the models of ``spec.slots``.
    """
    _redirect_output(stdout.fileno(), stderr.fileno())
    stdout.close()
    stderr.close()
    name_process(WORKER_NAME)
    limit_threads(spec.threads)
    initial: dict[int, Callable[[], Model]] = {
        slot: functools.partial(unpack_model, packages[slot]) for slot in spec.slots
    }
    _run(conn, events, initial, spec, parent_pidfd(spec.parent_pid))


def forked_worker_main(
    conn: Connection,
    events: Connection,
    stdout: int,
    stderr: int,
    models: dict[int, Model],
    spec: WorkerSpec,
    name: str,
    parent_fd: int,
) -> None:
    """Entry point of a worker forked from the template (called in the child).

    ``models`` are the template's unloaded copies (of ``spec.slots`` and maybe more),
    ``parent_fd`` a pidfd of the pool's process (``spec.parent_pid``; the template is
    only the direct parent). Native threads were limited in the template, whose
    environment and pools it inherits.
    """
    _redirect_output(stdout, stderr)
    os.close(stdout)
    os.close(stderr)
    name_process(WORKER_NAME)
    multiprocess.current_process().name = name
    # Taken out of the template's dict, the rest dropped: an unloaded model must leave
    # no reference behind (its memory is then released).
    initial = {slot: _given(models.pop(slot)) for slot in spec.slots}
    models.clear()
    _run(conn, events, initial, spec, parent_fd)


def _given(model: Model) -> Callable[[], Model]:
    return lambda: model


def _redirect_output(stdout: int, stderr: int) -> None:
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def _run(
    conn: Connection,
    events: Connection,
    initial: dict[int, Callable[[], Model]],
    spec: WorkerSpec,
    parent_fd: int | None,
) -> None:
    """Load the models and serve; the part both kinds of worker share."""
    faulthandler.enable()
    # The parent decides when workers stop: Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Daemonic in the parent (so its exit terminates us); not here, so that a model
    # may start processes of its own with multiprocess.
    multiprocess.current_process().daemon = False

    control = _Events(events)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardHandler(control)]
    root.setLevel(spec.log_level)
    threading.Thread(
        target=_watch_parent, args=(spec.parent_pid, parent_fd, spec.arena_path), daemon=True
    ).start()

    models: dict[int, _Loaded] = {}
    serving = threading.Event()
    threading.Thread(target=_follow, args=(events, control, models, serving), daemon=True).start()
    arena: Arena | None = None
    try:
        for slot in list(initial):
            _load(slot, initial.pop(slot), control, models)
        if not models:
            return
        if spec.arena_path is not None:
            arena = Arena.create(spec.arena_path)
        try:
            control.send(Serving(arena is not None))
        except OSError:
            return  # stopped while loading
        serving.set()
        _serve(Channel(conn.fileno()), models, arena, spec.shm_threshold)
    finally:
        for loaded in list(models.values()):
            loaded.runner.close()
        if arena is not None:
            # The parent unlinks it too; doing it here covers a parent that died.
            arena.close()
            arena.unlink()
