"""A worker's shared-memory arena: one file in ``/dev/shm`` both processes map.

Large tensor buffers go through it instead of the pipe. The worker creates it once
loaded, and the parent removes its name as soon as it has opened it too: from then on no
crash of either process can leave it behind. It is grown with ``posix_fallocate``, so a
full ``/dev/shm`` is an error caught here (the frame then carries the buffers itself)
instead of a SIGBUS later; it is never registered with a resource tracker, so no process
exit can unlink it under the other (cpython#82300); a request costs no segment creation
and, once warm, no page fault.

Only one side writes the arena at a time: the parent writes a request only to a worker
it holds; the worker copies the request out, runs predict and writes its reply; the
parent copies the reply out before the worker can get more work.
"""

from __future__ import annotations

import mmap
import os
import uuid

__all__ = ["SHM_DIR", "Arena", "arena_path", "unlink_quietly"]

#: Where POSIX shared memory lives on Linux; elsewhere every buffer crosses the pipe.
SHM_DIR = "/dev/shm"
_MIN_ARENA = 1 << 20


class Arena:
    """One worker's shared-memory file, mapped by the parent and by the worker.

    Not thread-safe: each end is used by one thread at a time (whoever holds the worker
    in the parent, the worker's main thread). The file grows but never shrinks during
    the worker's life.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls, path: str) -> Arena | None:
        """Called in the worker: a new empty arena, or ``None`` if it cannot be made."""
        try:
            return cls(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            return None

    @classmethod
    def attach(cls, path: str) -> Arena | None:
        """Called in the parent: open a worker's arena (``None`` if it is gone)."""
        try:
            return cls(path, os.open(path, os.O_RDWR))
        except OSError:
            return None

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def _mapping(self, needed: int) -> mmap.mmap:
        """The mapping, remapped when the file grew (perhaps by the other process)."""
        if self._map is None or len(self._map) < needed:
            if self._map is not None:
                self._map.close()
                self._map = None
            self._map = mmap.mmap(self._fd, self.size)
        return self._map

    def reserve(self, needed: int) -> bool:
        """Make the arena hold ``needed`` bytes; ``False`` if ``/dev/shm`` cannot spare them.

        Growth takes at most half of the space still free, so serving one big tensor never
        starves other users of ``/dev/shm``.
        """
        size = self.size
        if needed > size:
            new_size = max(_MIN_ARENA, 1 << (needed - 1).bit_length())
            try:
                free = os.statvfs(os.path.dirname(self.path))
                if new_size - size > free.f_bavail * free.f_frsize // 2:
                    return False
                os.posix_fallocate(self._fd, 0, new_size)
            except OSError:
                return False
        self._mapping(needed)
        return True

    def put(self, offset: int, data: memoryview) -> None:
        with memoryview(self._mapping(offset + data.nbytes)) as whole:
            whole[offset : offset + data.nbytes] = data

    def take(self, offset: int, length: int) -> bytearray:
        """A private copy of ``length`` bytes at ``offset``."""
        with memoryview(self._mapping(offset + length)) as whole:
            return bytearray(whole[offset : offset + length])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        unlink_quietly(self.path)


def arena_path(prefix: str, directory: str = SHM_DIR) -> str | None:
    """Called in the parent: a fresh name for a worker's arena, ``None`` without usable shm.

    The worker creates the file once it has loaded the model (and removes it when it
    exits), so a worker that dies while starting, even with its parent, leaves nothing.
    """
    if not hasattr(os, "posix_fallocate") or not os.path.isdir(directory):
        return None
    return os.path.join(directory, f"{prefix}-{uuid.uuid4().hex[:12]}")


def unlink_quietly(path: str) -> None:
    """Remove an arena file; it may already be gone (the worker removes it if orphaned)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
