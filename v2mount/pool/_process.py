"""One worker process as the parent sees it: its pipes, its exit fd, its arena, its output.

Everything here is called in the parent, from the pool's supervisor thread, except the
request channel (``conn``), which belongs to whoever holds the worker (``_state.Worker``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from v2mount.pool._arena import Arena, unlink_quietly
from v2mount.pool._shipping import ModelPackage
from v2mount.pool._worker import WorkerSpec, worker_main

if TYPE_CHECKING:
    from multiprocess.context import SpawnContext

__all__ = ["WorkerProcess"]

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


class WorkerProcess:
    """A started worker process: its pipes, exit fd, arena path and output streams."""

    def __init__(
        self,
        context: SpawnContext,
        spec: WorkerSpec,
        package: ModelPackage,
        name: str,
        log: LogSink,
    ) -> None:
        self.id = spec.worker_id
        #: Where the worker makes its arena, and the arena once the worker reports it made it.
        self.arena_path = spec.arena_path
        self.arena: Arena | None = None
        #: The request channel (a socket pair) and the control pipe (worker to parent).
        self.conn, child_conn = context.Pipe(duplex=True)
        self.events, events_write = context.Pipe(duplex=False)
        out_read, out_write = context.Pipe(duplex=False)
        err_read, err_write = context.Pipe(duplex=False)
        self.process = context.Process(
            target=worker_main,
            args=(child_conn, events_write, out_write, err_write, package, spec),
            name=name,
            daemon=True,
        )
        try:
            self.process.start()
        except BaseException:
            for end in (self.conn, self.events, out_read, err_read):
                end.close()
            raise
        finally:
            for end in (child_conn, events_write, out_write, err_write):
                end.close()
        self.pid: int = self.process.pid
        self._outputs = {
            out_read.fileno(): (out_read, _Lines("stdout", logging.INFO, log)),
            err_read.fileno(): (err_read, _Lines("stderr", logging.WARNING, log)),
        }
        for fd in self._outputs:
            os.set_blocking(fd, False)
        self._pidfd = -1
        if hasattr(os, "pidfd_open"):
            # Unlike the sentinel pipe, a pidfd fires even if the model forked a child
            # that inherited the worker's end of the pipe.
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:
                self._pidfd = -1
        self.exit_fd: int = self._pidfd if self._pidfd >= 0 else self.process.sentinel

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
        if self.process.exitcode is None:
            self.process.kill()

    def reap(self, timeout: float | None = None) -> None:
        self.process.join(timeout)

    def describe_exit(self) -> str:
        code = self.process.exitcode
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
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self.arena is not None:
            self.arena.close()
        if self.arena_path is not None:
            unlink_quietly(self.arena_path)
        # No ``process.close()``: at interpreter exit, multiprocess may still be joining
        # this process from the main thread; the Popen frees its fd when collected.
