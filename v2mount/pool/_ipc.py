"""What crosses between the pool and a worker: frames, the shared-memory arena, wire tuples.

Each request and each reply is one frame: a pickle (protocol 5) of plain tuples, never of
pydantic objects. numpy buffers of at least ``threshold`` bytes go out of band into the
worker's *arena*: one file in ``/dev/shm`` that both processes map and reuse for every
message. The worker creates it once loaded, and the parent removes its name as soon as it
has opened it too: from then on no crash of either process can leave it behind. It is
grown with ``posix_fallocate``, so a full ``/dev/shm`` is an error caught here (the frame
then carries the buffers itself) instead of a SIGBUS later; it is never registered with a
resource tracker, so no process exit can unlink it under the other (cpython#82300); a
request costs no segment creation and, once warm, no page fault.

Only one side writes the arena at a time: the parent writes a request only to an idle
worker; the worker copies the request out, runs predict and writes its reply; the parent
copies the reply out before the worker can get more work. Receivers always copy, so no
array ever aliases shared memory that is about to be reused.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import uuid
from typing import Any

from v2mount import errors
from v2mount.errors import ModelError, V2MountError, describe_exception
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

__all__ = [
    "SHM_DIR",
    "Arena",
    "arena_path",
    "decode",
    "encode",
    "error_from_wire",
    "error_to_wire",
    "request_from_wire",
    "request_to_wire",
    "response_from_wire",
    "response_to_wire",
    "unlink_quietly",
]

#: Where POSIX shared memory lives on Linux; elsewhere every buffer crosses the pipe.
SHM_DIR = "/dev/shm"
_ALIGN = 64
_MIN_ARENA = 1 << 20
_COUNT = struct.Struct("<H")
_SPAN = struct.Struct("<QQ")

TensorWire = tuple[str, str, tuple[int, ...], dict[str, Any], Any]
RequestWire = tuple[
    str | None, dict[str, Any], list[tuple[str, dict[str, Any]]] | None, list[TensorWire]
]
ResponseWire = tuple[str, str | None, str | None, dict[str, Any], list[TensorWire]]
ErrorWire = tuple[str, str, bytes | None]


class Arena:
    """One worker's shared-memory file, mapped by the parent and by the worker.

    Not thread-safe: each end is used by one thread (the pool's monitor thread, the
    worker's main thread). The file grows but never shrinks during the worker's life.
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


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def encode(obj: Any, arena: Arena | None, threshold: int) -> bytes:
    """One frame for ``obj``; large numpy buffers go to ``arena`` when it has room."""
    if arena is not None:
        large: list[pickle.PickleBuffer] = []

        def route(buffer: pickle.PickleBuffer) -> bool:
            with buffer.raw() as raw:
                if raw.nbytes < threshold:
                    return True
            large.append(buffer)
            return False

        body = pickle.dumps(obj, protocol=5, buffer_callback=route)
        if not large:
            return _COUNT.pack(0) + body
        spans: list[tuple[int, int]] = []
        end = 0
        for buffer in large:
            with buffer.raw() as raw:
                spans.append((end, raw.nbytes))
                end = _aligned(end + raw.nbytes)
        if arena.reserve(end):
            for (offset, _), buffer in zip(spans, large, strict=True):
                with buffer.raw() as raw:
                    arena.put(offset, raw)
            header = [_COUNT.pack(len(spans)), *(_SPAN.pack(*span) for span in spans)]
            return b"".join([*header, body])
    return _COUNT.pack(0) + pickle.dumps(obj, protocol=5)


def decode(frame: bytes, arena: Arena | None) -> Any:
    """The object in ``frame``; out-of-band buffers are copied out of ``arena``."""
    (count,) = _COUNT.unpack_from(frame, 0)
    position = _COUNT.size
    buffers: list[bytearray] = []
    for _ in range(count):
        offset, length = _SPAN.unpack_from(frame, position)
        position += _SPAN.size
        if arena is None:
            raise ValueError("frame refers to shared memory but this end has no arena")
        buffers.append(arena.take(offset, length))
    with memoryview(frame) as view:
        return pickle.loads(view[position:], buffers=buffers)


def _tensors_to_wire(tensors: list[Tensor]) -> list[TensorWire]:
    return [(t.name, t.datatype, tuple(t.shape), t.parameters, t.data) for t in tensors]


def _tensors_from_wire(wire: list[TensorWire]) -> list[Tensor]:
    return [Tensor(name, dt, shape, data, params) for name, dt, shape, params, data in wire]


def request_to_wire(request: InferenceRequest) -> RequestWire:
    outputs = (
        None if request.outputs is None else [(out.name, out.parameters) for out in request.outputs]
    )
    return (request.id, request.parameters, outputs, _tensors_to_wire(request.inputs))


def request_from_wire(wire: RequestWire) -> InferenceRequest:
    request_id, parameters, outputs, inputs = wire
    return InferenceRequest(
        inputs=_tensors_from_wire(inputs),
        id=request_id,
        parameters=parameters,
        outputs=None if outputs is None else [RequestedOutput(n, p) for n, p in outputs],
    )


def response_to_wire(response: InferenceResponse) -> ResponseWire:
    return (
        response.model_name,
        response.model_version,
        response.id,
        response.parameters,
        _tensors_to_wire(response.outputs),
    )


def response_from_wire(wire: ResponseWire) -> InferenceResponse:
    model_name, model_version, response_id, parameters, outputs = wire
    return InferenceResponse(
        model_name, _tensors_from_wire(outputs), model_version, response_id, parameters
    )


def error_to_wire(exc: Exception) -> ErrorWire:
    """Called in the worker: an exception as (v2mount base class name, message, pickle).

    A ``V2MountError`` keeps its class (even a user subclass, when the parent can import
    it); anything else becomes a ``ModelError`` carrying ``"Type: message"``. Tracebacks
    never cross: the worker logs them.
    """
    if isinstance(exc, V2MountError):
        base = next(c for c in type(exc).__mro__ if c.__module__ == errors.__name__)
        try:
            blob: bytes | None = pickle.dumps(exc, protocol=5)
        except Exception:
            blob = None
        return (base.__name__, exc.message, blob)
    return (ModelError.__name__, describe_exception(exc), None)


def error_from_wire(wire: ErrorWire) -> V2MountError:
    """Called in the parent: the exception to raise for an ``error_to_wire`` tuple."""
    base_name, message, blob = wire
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
        if isinstance(exc, V2MountError):
            return exc
    base = getattr(errors, base_name, ModelError)
    if not (isinstance(base, type) and issubclass(base, V2MountError)):
        base = ModelError
    return base(message)
