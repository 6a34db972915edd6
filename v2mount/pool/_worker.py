"""The worker process: everything here is called in the child.

A worker limits native thread pools, unpickles the model (dill bytes made by the parent),
loads it once, creates its shared-memory arena, then answers one framed request at a time
until its request channel reaches EOF (the pool closed it, or the parent died). Its
stdout and stderr are the pool's pipes; its log records, and its ``Ready`` or
``LoadFailed``, travel on the control pipe. It
removes its arena when it exits, and exits by itself when orphaned, so even a SIGKILLed
parent leaves no process and no shared memory behind.

A worker starts one of two ways: spawned (``worker_main``: a fresh interpreter that
unpickles the model itself), or forked from the pool's template process
(``forked_worker_main``: the template has imported everything and unpickled the model
already, see ``_template.py``). From ``load`` on, both are the same.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import io
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import multiprocess
from multiprocess.connection import Connection

from v2mount.errors import V2MountError, describe_exception
from v2mount.model import MethodRunner, Model, build_response
from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._ipc import (
    REQUEST,
    Channel,
    DeclaredSpecs,
    LoadFailed,
    Log,
    Ready,
    decode_request,
    encode_error,
    encode_result,
    frame_kind,
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

    Sent to the template as JSON (``dataclasses.asdict``): plain fields only.
    """

    worker_id: int
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

    def send(self, message: Ready | LoadFailed | Log) -> None:
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


def _answer(runner: MethodRunner, frame: bytearray, arena: Arena | None, threshold: int) -> bytes:
    """The reply frame to one request frame: its result or its error, with the metrics."""
    if frame_kind(frame) != REQUEST:
        return answer_stage(runner, frame, arena, threshold)
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


def _serve(channel: Channel, runner: MethodRunner, arena: Arena | None, threshold: int) -> None:
    """Answer requests one at a time until the channel reaches EOF.

    Each frame is dropped as soon as it is used, so an idle worker holds no tensor.
    """
    while True:
        try:
            frame = channel.receive()
        except (EOFError, OSError):
            return
        reply = _answer(runner, frame, arena, threshold)
        del frame
        try:
            channel.send(reply)
        except OSError:
            return
        del reply


def worker_main(
    conn: Connection,
    events: Connection,
    stdout: Connection,
    stderr: Connection,
    package: ModelPackage,
    spec: WorkerSpec,
) -> None:
    """Entry point of a spawned worker process (called in the child).

    ``conn``: the request channel (frames of ``_ipc``); ``events``: the control pipe.
    """
    _redirect_output(stdout.fileno(), stderr.fileno())
    stdout.close()
    stderr.close()
    name_process(WORKER_NAME)
    limit_threads(spec.threads)
    _run(
        conn, events, functools.partial(unpack_model, package), spec, parent_pidfd(spec.parent_pid)
    )


def forked_worker_main(
    conn: Connection,
    events: Connection,
    stdout: int,
    stderr: int,
    model: Model,
    spec: WorkerSpec,
    name: str,
    parent_fd: int,
) -> None:
    """Entry point of a worker forked from the template (called in the child).

    ``model`` is the template's unloaded copy, ``parent_fd`` a pidfd of the pool's
    process (``spec.parent_pid``; the template is only the direct parent). Native
    threads were limited in the template, whose environment and pools it inherits.
    """
    _redirect_output(stdout, stderr)
    os.close(stdout)
    os.close(stderr)
    name_process(WORKER_NAME)
    multiprocess.current_process().name = name
    _run(conn, events, lambda: model, spec, parent_fd)


def _redirect_output(stdout: int, stderr: int) -> None:
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def _run(
    conn: Connection,
    events: Connection,
    obtain: Callable[[], Model],
    spec: WorkerSpec,
    parent_fd: int | None,
) -> None:
    """Load the model and serve; the part both kinds of worker share."""
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

    runner: MethodRunner | None = None
    arena: Arena | None = None
    try:
        try:
            model = obtain()
            runner = MethodRunner(model)
            declared = DeclaredSpecs.of(model.settings)
            runner.run(model.load)
        except Exception as exc:
            drained = runner.model.metrics.drain() if runner is not None else []
            failed = LoadFailed(describe_exception(exc), drained, traceback.format_exc())
            with contextlib.suppress(OSError):
                control.send(failed)
            return
        if spec.arena_path is not None:
            arena = Arena.create(spec.arena_path)
        # What load declared (an ONNX graph's inputs, say) is metadata the parent serves.
        changed = DeclaredSpecs.of(model.settings)
        ready = Ready(
            model.metrics.drain(), changed if changed != declared else None, arena is not None
        )
        try:
            control.send(ready)
        except OSError:
            return  # stopped while loading
        _serve(Channel(conn.fileno()), runner, arena, spec.shm_threshold)
    finally:
        if runner is not None:
            runner.close()
        if arena is not None:
            # The parent unlinks it too; doing it here covers a parent that died.
            arena.close()
            arena.unlink()
