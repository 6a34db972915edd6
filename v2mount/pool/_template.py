"""The template: one process per pool that forks its workers with everything imported.

A spawned worker pays for a fresh interpreter, ``import numpy`` and the model's module
before its ``load`` even starts (about a second); a worker forked from a process that
did all that costs a few milliseconds. The pool's own process must not fork (it runs
threads and an event loop), so each pool spawns a *template* process that:

- limits native thread pools as its workers will, unpickles the pool's models (one, or
  each model of a shared pool: importing their modules) without loading them, imports
  the modules the models preload (``Model.preload`` and ``preload`` in their settings:
  the framework their ``load`` imports), and checks that no Python thread was started
  meanwhile (a fork keeps only the forking thread; native pools such as OpenBLAS's
  handle fork themselves, and the template never runs model code that would start an
  OpenMP team). A preload that fails to import is logged once and skipped (the worker's
  ``load`` meets the error itself); one that starts a thread gets a new template that
  skips it;
- forks a worker when the parent asks over a Unix socket. The parent makes the worker's
  pipes and passes their fds (``SCM_RIGHTS``); the template answers with the worker's
  pid and a pidfd of it, which the parent watches (workers are the template's children,
  not the parent's). The template reaps its workers and reports each exit status;
- exits when the parent dies (it watches a pidfd of the parent, which its workers
  inherit to watch the parent too) or closes the socket.

A forked worker ends with ``os._exit`` (as ``multiprocessing``'s fork start method does),
so ``atexit`` handlers do not run in it. It reseeds numpy's global random generator
unless the model's module seeded it, so workers do not share one random stream.

Where no template can serve (not Linux 5.3+, a module that started a thread, models
the template cannot unpickle, a template that keeps dying while it starts), workers are
spawned as before. A model the template does not hold (it joined a running shared pool,
or the template could not unpickle it) is loaded by a forked worker after it serves
(``Load``); a worker that would hold none of its models is spawned. A template that
dies is started again; until it is ready, workers are spawned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from multiprocess.connection import Connection

from v2mount.model import Model
from v2mount.pool._process import Handle, LogSink, WorkerProcess
from v2mount.pool._shipping import ModelPackage, unpack_model
from v2mount.pool._worker import (
    WorkerSpec,
    forked_worker_main,
    limit_threads,
    name_process,
    parent_pidfd,
)

if TYPE_CHECKING:
    from multiprocess.context import SpawnContext
    from multiprocess.process import BaseProcess

__all__ = ["TEMPLATE_NAME", "Template", "template_main", "template_supported"]

#: What ``ps`` and ``/proc/<pid>/comm`` call a template process (Linux).
TEMPLATE_NAME = "v2mount-tmpl"
#: How long the first template may take to import; past that, the pool spawns instead.
BOOT_TIMEOUT = 60.0
#: How long a fork may take before the template is taken for stuck.
_FORK_TIMEOUT = 10.0
#: Templates that die before they are ready, in a row, before the pool gives up on them.
_MAX_BOOT_FAILURES = 3
_MAX_MESSAGE = 1 << 16
_MAX_OUTPUT = 16384

logger = logging.getLogger("v2mount.pool")

_BOOTING, _READY, _GONE = "booting", "ready", "gone"


def template_supported() -> bool:
    """Whether this platform has what a template needs (pidfds, fd passing, memfds)."""
    return (
        sys.platform == "linux"
        and hasattr(os, "pidfd_open")
        and hasattr(os, "memfd_create")
        and hasattr(signal, "pidfd_send_signal")
        and hasattr(socket, "send_fds")
    )


# -- in the parent ---------------------------------------------------------------------


class _Session:
    """One template process as the parent sees it."""

    def __init__(
        self,
        context: SpawnContext,
        packages: Mapping[int, ModelPackage],
        threads: int | None,
        name: str,
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process: BaseProcess = context.Process(
            target=template_main,
            args=(theirs, dict(packages), os.getpid(), threads),
            name=name,
            daemon=True,
        )
        try:
            self.process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        # Not ``process.sentinel``: forked workers inherit its other end, so it would
        # not fire while they live. The template is our child: no pid reuse before join.
        self._pidfd = os.pidfd_open(self.process.pid)
        self.state = _BOOTING
        #: Why the template cannot serve (it said so, or it died).
        self.why: str | None = None
        #: Whether it was ever ready, and whether another try would fare no better.
        self.was_ready = False
        self.hopeless = False
        #: What the template printed while importing, (stdout, stderr), until logged.
        self.output: tuple[str, str] | None = None
        #: The slots of the models it holds (once ready).
        self.held: frozenset[int] = frozenset()
        #: Preloads the template could not import, as (module, why).
        self.failed_preloads: list[tuple[str, str]] = []
        #: The preload whose import started a thread, which made the template unusable.
        self.threaded_preload: str | None = None
        self._codes: dict[int, int] = {}
        self._forked: tuple[int, int] | str | None = None

    def receive(self, timeout: float | None) -> bool:
        """Handle one message of the template; ``False`` if none came within ``timeout``."""
        if self.state == _GONE:
            return False
        if timeout is not None:
            timeout = max(0.0, timeout)
        if not select.select([self._sock], [], [], timeout)[0]:
            return False
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            self.close(f"the template process {self.process.pid} exited")
            return True
        message: list[Any] = json.loads(data)
        kind = message[0]
        if kind == "exited":
            self._codes[message[1]] = message[2]
        elif kind == "forked" and fds:
            self._forked = (message[1], fds.pop())
        elif kind == "fork_failed":
            self._forked = message[1]
        elif kind == "ready":
            self.state, self.was_ready, self.output = _READY, True, tuple(message[1])
            self.held = frozenset(message[2])
            self.failed_preloads = [(name, why) for name, why in message[3]]
        elif kind == "unusable":
            self.output, self.threaded_preload = tuple(message[2]), message[3]
            self.hopeless = self.threaded_preload is None
            self.close(message[1])
        for fd in fds:
            os.close(fd)
        return True

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.state == _BOOTING and time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())
        if self.state == _BOOTING:
            self.hopeless = True
            self.close(f"the template did not start within {timeout:g} s")

    def fork(self, spec: WorkerSpec, name: str, fds: list[int]) -> tuple[int, int] | str:
        """Have the template fork a worker: its (pid, pidfd), or why it could not."""
        self._forked = None
        try:
            request = json.dumps([dataclasses.asdict(spec), name]).encode()
            socket.send_fds(self._sock, [request], fds)
        except OSError as exc:
            self.close(f"the template cannot be reached: {exc}")
        deadline = time.monotonic() + _FORK_TIMEOUT
        while self._forked is None and self.state != _GONE:
            if not self.receive(deadline - time.monotonic()) and time.monotonic() >= deadline:
                self.close(f"the template did not fork within {_FORK_TIMEOUT:g} s")
        return self._forked if self._forked is not None else str(self.why)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        """The exit code of a worker it forked; ``None`` if unknown (or not yet)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._codes and self.state != _GONE:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self.receive(remaining)
        return self._codes.pop(pid, None)

    def close(self, why: str) -> None:
        """Stop the template (its workers live on) and wait for it to exit."""
        if self.state == _GONE:
            return
        self.state, self.why = _GONE, why
        self._sock.close()  # the template exits at EOF
        if not select.select([self._pidfd], [], [], 2.0)[0]:
            self.process.kill()
        self.process.join()
        os.close(self._pidfd)


class _NotForked(Exception):
    """The template could not fork a worker (the text says why)."""


class _ForkedHandle:
    """A worker forked by a template: watched and killed through its pidfd."""

    def __init__(self, session: _Session, pid: int, pidfd: int) -> None:
        self._session = session
        self.pid = pid
        self.exit_fd = pidfd
        self._code: int | None = None

    def kill(self) -> None:
        if self.exit_fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.exit_fd, signal.SIGKILL)

    def reap(self, timeout: float | None) -> None:
        if self._code is None:
            self._code = self._session.wait_exit(self.pid, timeout)

    def exit_code(self) -> int | None:
        return self._code

    def close(self) -> None:
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1


class Template:
    """Starts a pool's workers: forked from its template process where it can, else spawned.

    Called in the parent, from one thread at a time (the thread that runs the pool's processes).
    ``start`` spawns the template and returns at once; the first ``fork_worker`` waits
    until the template has imported everything (``BOOT_TIMEOUT`` at most), later ones
    never wait for a template: while one is restarting, workers are spawned.
    """

    def __init__(
        self,
        context: SpawnContext,
        packages: Mapping[int, ModelPackage],
        threads: int | None,
        name: str,
        log: LogSink,
    ) -> None:
        self._context = context
        self._packages = dict(packages)
        self._threads = threads
        self._name = name
        self._log = log
        self._session: _Session | None = None
        #: Whether a template was ever ready: only the first one is waited for.
        self._ever_ready = False
        self._boot_failures = 0
        self._reported_preloads: set[str] = set()
        #: Why workers are spawned for good, if they are.
        self.disabled: str | None = None if template_supported() else "no pidfd on this platform"

    @property
    def pid(self) -> int | None:
        """The template process, while there is one."""
        session = self._session
        return session.process.pid if session is not None and session.state != _GONE else None

    def start(self) -> None:
        """Spawn the template process, unless templates cannot serve here."""
        if self.disabled is not None or self._session is not None:
            return
        try:
            self._session = _Session(self._context, self._packages, self._threads, self._name)
        except Exception as exc:
            self._disable(f"the template process cannot start: {exc}")

    def fork_worker(
        self,
        spec: WorkerSpec,
        packages: Mapping[int, ModelPackage],
        name: str,
        log: LogSink,
    ) -> WorkerProcess:
        """Start one worker for the models of ``spec.slots`` (``packages`` has them all):
        forked from the template if it is ready and holds some of them, else spawned.

        A forked worker starts with the models the template holds (its ``slots``); the
        caller sends it the others. Raises what ``WorkerProcess.spawn`` raises when no
        process can be started.
        """
        session = self._ready_session()
        if session is not None:
            held = tuple(slot for slot in spec.slots if slot in session.held)
            if held:
                worker = self._fork(session, dataclasses.replace(spec, slots=held), name, log)
                if worker is not None:
                    return worker
        return WorkerProcess.spawn(self._context, spec, packages, name, log)

    def stop(self) -> None:
        """Stop the template process (the pool stops its workers itself)."""
        if self._session is not None:
            self._session.close("stopped")
            self._session = None
        self.disabled = self.disabled or "stopped"

    def _ready_session(self) -> _Session | None:
        """The template if it can fork now; starts another if it died, or gives up."""
        session = self._session
        if session is None:
            return None
        while session.receive(0):
            pass
        if session.state == _BOOTING and not self._ever_ready:
            session.wait_ready(BOOT_TIMEOUT)
        self._log_output(session)
        if session.state == _READY:
            self._ever_ready = True
            self._boot_failures = 0
            self._report_preloads(session)
            return session
        if session.state == _GONE and session.threaded_preload is not None:
            culprit = session.threaded_preload
            logger.warning("model %s: %s; starting a template without it", self._name, session.why)
            self._packages = {
                slot: dataclasses.replace(
                    package, preload=tuple(name for name in package.preload if name != culprit)
                )
                for slot, package in self._packages.items()
            }
            self._session = None
            self.start()
            return self._ready_session()
        if session.state == _GONE:
            if not session.was_ready:
                self._boot_failures += 1
            if session.hopeless:
                self._disable(str(session.why))
            elif self._boot_failures >= _MAX_BOOT_FAILURES:
                self._disable(f"{session.why} ({self._boot_failures} times in a row)")
            else:
                logger.warning("model %s: %s; starting another", self._name, session.why)
                self._session = None
                self.start()
        return None

    def _fork(
        self, session: _Session, spec: WorkerSpec, name: str, log: LogSink
    ) -> WorkerProcess | None:
        def launch(
            conn: Connection, events: Connection, stdout: Connection, stderr: Connection
        ) -> Handle:
            fds = [conn.fileno(), events.fileno(), stdout.fileno(), stderr.fileno()]
            forked = session.fork(spec, name, fds)
            if isinstance(forked, str):
                raise _NotForked(forked)
            return _ForkedHandle(session, *forked)

        try:
            return WorkerProcess.start(self._context, spec, log, launch)
        except _NotForked as exc:
            logger.warning("model %s: no worker forked (%s); spawning one", self._name, exc)
            return None

    def _report_preloads(self, session: _Session) -> None:
        for name, why in session.failed_preloads:
            if name not in self._reported_preloads:
                self._reported_preloads.add(name)
                logger.warning(
                    "model %s: the template could not preload %r (%s); each worker's load "
                    "imports what it needs itself",
                    self._name,
                    name,
                    why,
                )
        session.failed_preloads = []

    def _disable(self, why: str) -> None:
        logger.info("model %s: workers are spawned, not forked: %s", self._name, why)
        self.disabled = why
        if self._session is not None:
            self._session.close(why)
            self._session = None

    def _log_output(self, session: _Session) -> None:
        output, session.output = session.output or ("", ""), None
        for text, level in zip(output, (logging.INFO, logging.WARNING), strict=True):
            for line in text.splitlines():
                self._log(level, f"template: {line}")


# -- in the template -------------------------------------------------------------------


def template_main(
    control: socket.socket,
    packages: dict[int, ModelPackage],
    parent_pid: int,
    threads: int | None,
) -> None:
    """Entry point of the template process (called in the child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process(TEMPLATE_NAME)
    parent_fd = parent_pidfd(parent_pid)
    if parent_fd is None:
        return  # the parent died already
    limit_threads(threads)
    seeded = _numpy_random_state()
    models: dict[int, Model] = {}
    why = culprit = None
    failed: list[tuple[str, str]] = []
    with _captured_output() as output:
        for slot, package in packages.items():
            try:
                models[slot] = unpack_model(package)
            except BaseException:
                traceback.print_exc()
        if not models:
            why = "the template cannot unpickle the model"
        elif threading.active_count() > 1:
            why = "importing the model's module started a thread"
        reseed = _numpy_random_state() == seeded
        if why is None:
            # Every model's, held or not: a forked worker may load the others later.
            names = (name for package in packages.values() for name in package.preload)
            failed, culprit = _preload(tuple(dict.fromkeys(names)))
            if culprit is not None:
                why = f"importing the preloaded module {culprit!r} started a thread"
    if why is None:
        _send(control, ("ready", tuple(output), sorted(models), failed))
    else:
        _send(control, ("unusable", why, tuple(output), culprit))
    if why is None:
        _serve(control, parent_fd, models, reseed=reseed)


def _preload(names: tuple[str, ...]) -> tuple[list[tuple[str, str]], str | None]:
    """Import ``names`` in order: those that failed (with why), and the first that started
    a thread (the rest are not imported then: the template will not fork)."""
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # an import may raise anything, SystemExit too
            failed.append((name, f"{type(exc).__name__}: {exc}"))
        if threading.active_count() > 1:
            return failed, name
    return failed, None


def _numpy_random_state() -> bytes:
    state: Any = np.random.get_state()  # ("MT19937", keys, position, has_gauss, gauss)
    return bytes(state[1].tobytes()) + repr(state[2:]).encode()


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Collect what fds 1 and 2 receive meanwhile (imports may print or warn)."""
    captured: list[str] = []
    # Anonymous memory files: nothing on disk, nothing left behind by a crash.
    with (
        open(os.memfd_create("stdout"), "w+b") as out,
        open(os.memfd_create("stderr"), "w+b") as err,
    ):
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved, strict=True):
                os.dup2(original, fd)
                os.close(original)
            for sink in (out, err):
                sink.seek(-min(_MAX_OUTPUT, sink.tell()), os.SEEK_END)
                captured.append(sink.read().decode("utf-8", "replace"))


def _send(control: socket.socket, message: tuple[Any, ...], fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(control, [json.dumps(message).encode()], list(fds))


def _serve(
    control: socket.socket, parent_fd: int, models: dict[int, Model], *, reseed: bool
) -> None:
    """Fork workers on request and report their exits, until the parent goes."""
    children: dict[int, int] = {}  # pidfd -> pid
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(parent_fd, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == parent_fd:
                    return
                if key.fd in children:
                    pid = children.pop(key.fd)
                    selector.unregister(key.fd)
                    os.close(key.fd)
                    _, status = os.waitpid(pid, 0)
                    _send(control, ("exited", pid, os.waitstatus_to_exitcode(status)))
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 4)
                except OSError:
                    return
                if not data:
                    return
                fields, name = json.loads(data)
                spec = WorkerSpec(**{**fields, "slots": tuple(fields["slots"])})
                sys.stdout.flush()
                sys.stderr.flush()
                try:
                    pid = os.fork()
                except OSError as exc:
                    for fd in fds:
                        os.close(fd)
                    _send(control, ("fork_failed", f"fork failed: {exc}"))
                    continue
                if pid == 0:
                    selector.close()
                    control.close()
                    for fd in children:
                        os.close(fd)
                    _run_worker(fds, models, spec, name, parent_fd, reseed)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                selector.register(pidfd, selectors.EVENT_READ)
                _send(control, ("forked", pid), (pidfd,))


def _run_worker(
    fds: list[int],
    models: dict[int, Model],
    spec: WorkerSpec,
    name: str,
    parent_fd: int,
    reseed: bool,
) -> NoReturn:
    """The forked child's whole life: be a worker, then exit (never return to the loop)."""
    code = 1
    try:
        if reseed:
            np.random.seed()
        conn, events, stdout, stderr = fds
        forked_worker_main(
            Connection(conn),
            Connection(events),
            stdout,
            stderr,
            models,
            spec,
            name,
            parent_fd,
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
