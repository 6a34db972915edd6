"""One worker process as the parent sees it: its pipes, its exit fd, its arena, its output.

Everything here is called in the parent, from the pool's supervisor thread, except the
request channel (``conn``), which belongs to whoever holds the worker (``_state.Worker``).
How the process was started (spawned here, or forked by the pool's template) hides
behind a ``Handle``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from multiprocess.connection import Connection

from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._shipping import ModelPackage
from v2mount.pool._worker import WorkerSpec, worker_main

if TYPE_CHECKING:
    from multiprocess.context import SpawnContext
    from multiprocess.process import BaseProcess

__all__ = ["Handle", "LogSink", "WorkerProcess", "open_pidfd"]

_READ_SIZE = 65536
_MAX_LINE = 65536

#: Receives (level, text) for each line or record a worker produced.
LogSink = Callable[[int, str], None]


class _Lines:
    """Splits one output stream of a worker into lines for the log."""

    def __init__(self, name: str, level: int, log: LogSink) -> None:
        self._prefix = f"{name}: "
        self._level = level
        self._log = log
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            self._emit(line)
        if len(self._pending) > _MAX_LINE:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = b""

    def _emit(self, line: bytes) -> None:
        self._log(self._level, self._prefix + line.decode("utf-8", "replace").rstrip("\r"))


class Handle(Protocol):
    """How the parent controls one worker process, whichever way it was started."""

    pid: int
    #: Readable once the process has exited.
    exit_fd: int

    def kill(self) -> None: ...

    def reap(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for the exit status (the process must have exited)."""

    def exit_code(self) -> int | None:
        """The exit code once reaped, ``-N`` for signal N; ``None`` if unknown yet."""

    def close(self) -> None:
        """Release the handle's fds (once reaped)."""


class _SpawnedHandle:
    """A worker spawned by ``multiprocess``: a child of this process."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process
        self.pid: int = process.pid
        self._pidfd = open_pidfd(self.pid)
        # Unlike the sentinel pipe, a pidfd fires even if the model forked a child
        # that inherited the worker's end of the pipe.
        self.exit_fd: int = self._pidfd if self._pidfd >= 0 else process.sentinel

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()

    def reap(self, timeout: float | None) -> None:
        self._process.join(timeout)

    def exit_code(self) -> int | None:
        code: int | None = self._process.exitcode
        return code

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        # No ``process.close()``: at interpreter exit, multiprocess may still be joining
        # this process from the main thread; the Popen frees its fd when collected.


def open_pidfd(pid: int) -> int:
    """A pidfd of ``pid``, or -1 where there is none (not Linux, or Linux < 5.3)."""
    if hasattr(os, "pidfd_open"):
        try:
            return os.pidfd_open(pid)
        except OSError:
            pass
    return -1


class WorkerProcess:
    """A started worker process: its pipes, exit fd, arena path and output streams.

    Made by ``spawn`` here, or by ``Template.fork_worker``; users see no difference.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        conn: Connection,
        events: Connection,
        stdout: Connection,
        stderr: Connection,
        handle: Handle,
        log: LogSink,
    ) -> None:
        self.id = spec.worker_id
        #: The models (slots) it loads before it serves.
        self.slots = spec.slots
        #: Where the worker makes its arena, and the arena once the worker reports it made it.
        self.arena_path = spec.arena_path
        self.arena: Arena | None = None
        #: The request channel and the control pipe (both ways), socket pairs both.
        self.conn = conn
        self.events = events
        self._handle = handle
        self.pid: int = handle.pid
        self.exit_fd: int = handle.exit_fd
        self._outputs = {
            stdout.fileno(): (stdout, _Lines("stdout", logging.INFO, log)),
            stderr.fileno(): (stderr, _Lines("stderr", logging.WARNING, log)),
        }
        for fd in self._outputs:
            os.set_blocking(fd, False)

    @classmethod
    def start(
        cls,
        context: SpawnContext,
        spec: WorkerSpec,
        log: LogSink,
        launch: Callable[[Connection, Connection, Connection, Connection], Handle],
    ) -> WorkerProcess:
        """Make the worker's pipes and start it with ``launch(requests, events, stdout,
        stderr)``.

        ``launch`` gets the child's ends of the pipes (closed here once it returns) and
        returns the started process's handle; whatever it raises is raised here.
        """
        conn, child_conn = context.Pipe(duplex=True)
        events, events_write = context.Pipe(duplex=True)
        out_read, out_write = context.Pipe(duplex=False)
        err_read, err_write = context.Pipe(duplex=False)
        try:
            handle = launch(child_conn, events_write, out_write, err_write)
        except BaseException:
            for end in (conn, events, out_read, err_read):
                end.close()
            raise
        finally:
            for end in (child_conn, events_write, out_write, err_write):
                end.close()
        return cls(spec, conn, events, out_read, err_read, handle, log)

    @classmethod
    def spawn(
        cls,
        context: SpawnContext,
        spec: WorkerSpec,
        packages: Mapping[int, ModelPackage],
        name: str,
        log: LogSink,
    ) -> WorkerProcess:
        """Start a worker in a fresh interpreter (what a pool without template does)."""
        packages = {slot: packages[slot] for slot in spec.slots}

        def launch(
            conn: Connection, events: Connection, stdout: Connection, stderr: Connection
        ) -> Handle:
            process = context.Process(
                target=worker_main,
                args=(conn, events, stdout, stderr, packages, spec),
                name=name,
                daemon=True,
            )
            process.start()
            return _SpawnedHandle(process)

        return cls.start(context, spec, log, launch)

    @property
    def output_fds(self) -> list[int]:
        return list(self._outputs)

    def read_output(self, fd: int) -> bool:
        """Log what the worker wrote on one stream; ``False`` once that stream is closed."""
        lines = self._outputs[fd][1]
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                lines.flush()
                return False
            lines.feed(chunk)

    def close_input(self) -> None:
        """End the request channel: an idle worker exits when it reads EOF.

        A shutdown, not a close: whoever holds the worker may be waiting on the
        descriptor, and must see EOF rather than a closed (or reused) one.
        """
        if not self.conn.closed:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def resident_mb(self) -> float | None:
        """The worker's resident memory now (Linux ``/proc``; ``None`` elsewhere)."""
        try:
            with open(f"/proc/{self.pid}/statm") as statm:
                pages = int(statm.read().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)

    def kill(self) -> None:
        self._handle.kill()

    def reap(self, timeout: float | None = None) -> None:
        self._handle.reap(timeout)

    @property
    def exit_code(self) -> int | None:
        """Its exit code once reaped (``-N``: killed by signal N); ``None`` if unknown."""
        return self._handle.exit_code()

    def describe_exit(self) -> str:
        code = self._handle.exit_code()
        if code is None:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def dispose(self) -> None:
        """Release every fd and the arena (the process must be reaped already)."""
        self.conn.close()
        self.events.close()
        for stream, lines in self._outputs.values():
            lines.flush()
            stream.close()
        self._handle.close()
        if self.arena is not None:
            self.arena.close()
        if self.arena_path is not None:
            unlink_quietly(self.arena_path)
