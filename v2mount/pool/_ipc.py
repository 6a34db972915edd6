"""What crosses between the pool and a worker: request and reply frames, control messages.

**Request channel** (a socket pair; at most one request on it at a time). Each request
and each reply is one frame, with no pickle in the common case::

    HEADER (struct) | meta | extra | padding to 64 | data

``HEADER`` holds the frame's length, its kind (request, result, error, or a stage call
and its reply: ``_stage_frames.py``), flags, the model's slot (which model of a shared
pool a call is for), the lengths of ``meta`` and ``extra`` and the request's sequence
number. ``meta`` is JSON
(orjson): the request's or response's id, parameters and requested outputs, and one entry
per tensor (name, datatype, shape, parameters, numpy dtype, where its bytes are). Tensor
bytes are raw: in ``data`` when small, in the worker's shared-memory arena
(``_arena.py``) when at least ``threshold`` bytes and the arena has room. BYTES tensors
travel as length-prefixed elements. pickle is used only for what is genuinely arbitrary:
``meta`` whose parameters are not plain JSON values (flag ``PICKLED_META``), tensors numpy
cannot describe by a dtype, the custom-metric updates in ``extra``, and errors.

**Control pipe** (both ways, only the pool's supervisor on the parent's end): from the
worker the typed messages ``Ready``, ``LoadFailed``, ``Serving``, ``Unloaded`` and
``Log``; to it ``Load`` and ``Unload`` (a model joining or leaving a running shared
pool). Pickled: a few per model and worker, never per request.

Receivers never alias shared memory: a tensor from the arena is copied out; one from
``data`` is a view of the frame, a private ``bytearray``.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

from v2mount import errors
from v2mount.errors import ModelError, V2MountError, describe_exception
from v2mount.metrics.custom import MetricUpdate
from v2mount.pool._arena import Arena
from v2mount.pool._shipping import ModelPackage
from v2mount.settings import ModelSettings
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

__all__ = [
    "ANSWERS",
    "ERROR",
    "PIPELINE",
    "PREDICT_POSTPROCESS",
    "PREPROCESS",
    "REQUEST",
    "RESULT",
    "Channel",
    "DeclaredSpecs",
    "Load",
    "LoadFailed",
    "Log",
    "Ready",
    "Reply",
    "Serving",
    "Unload",
    "Unloaded",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_request",
    "encode_result",
    "error_from_wire",
    "error_to_wire",
    "frame_kind",
    "frame_route",
    "updates_of",
]

#: Frame length, kind, flags, model slot, meta length, extra length, sequence number.
HEADER = struct.Struct("<QBBHIIQ")
REQUEST, RESULT, ERROR = 1, 2, 3
#: Stage calls (``_stage_frames.py``): preprocess several requests, predict a batch and
#: postprocess its requests, run preprocess → predict → postprocess on several requests;
#: and their reply.
PREPROCESS, PREDICT_POSTPROCESS, PIPELINE, ANSWERS = 4, 5, 6, 7
PICKLED_META = 1
_ALIGN = 64
_CHUNK = 1 << 16
# Where a tensor's bytes are.
_INLINE, _SHARED, _STRINGS, _PICKLED = range(4)
_LENGTH = struct.Struct("<I")
_NUMERIC_KINDS = frozenset("biufc")

ErrorWire = tuple[str, str, bytes | None]


# -- control messages (worker to parent, on the control pipe) ------------------------------


class DeclaredSpecs(NamedTuple):
    """Inputs and outputs a model's ``load`` declared (``TensorSpec`` dumps)."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    @classmethod
    def of(cls, settings: ModelSettings) -> DeclaredSpecs:
        """What ``settings`` declare now, as plain data for the parent."""
        return cls(
            [spec.model_dump() for spec in settings.inputs],
            [spec.model_dump() for spec in settings.outputs],
        )


class Ready(NamedTuple):
    """The worker loaded the model of ``slot``; ``declared`` when load changed its metadata."""

    slot: int
    updates: list[MetricUpdate]
    declared: DeclaredSpecs | None


class LoadFailed(NamedTuple):
    slot: int
    text: str
    updates: list[MetricUpdate]
    #: The load's traceback, formatted in the worker (logged by the parent, once).
    traceback: str = ""


class Serving(NamedTuple):
    """The worker loaded (or failed) every model it started with, and serves those it has.

    Never sent by a worker that loaded none: it exits instead.
    """

    has_arena: bool


class Unloaded(NamedTuple):
    """The worker dropped the model of ``slot``; ``freed``: the model object is gone
    (a weak reference died after a collection), ``None`` if that cannot be told."""

    slot: int
    freed: bool | None


class Load(NamedTuple):
    """Parent to worker: load a model that joined the running pool, as ``slot``."""

    slot: int
    package: ModelPackage


class Unload(NamedTuple):
    """Parent to worker: drop the model of ``slot`` and release its memory."""

    slot: int


class Log(NamedTuple):
    level: int
    name: str
    text: str


# -- frames --------------------------------------------------------------------------------


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _plain(value: Any) -> bool:
    """Whether JSON carries ``value`` unchanged (no tuple, NaN, numpy scalar or bytes)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-(1 << 63) <= value < (1 << 64))
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if kind is list:
        return all(_plain(v) for v in value)
    return False


def _strings(array: np.ndarray[Any, Any]) -> bytes | None:
    """An object array of ``bytes`` as length-prefixed elements (``None``: not all bytes)."""
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for item in array.flat:
        if type(item) is not bytes:
            return None
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def _from_strings(view: memoryview, count: int) -> np.ndarray[Any, Any]:
    out = np.empty(count, dtype=object)
    position = 0
    unpack = _LENGTH.unpack_from
    for i in range(count):
        (length,) = unpack(view, position)
        position += 4
        out[i] = bytes(view[position : position + length])
        position += length
    return out


def _buffer(data: Any) -> tuple[str | None, int, memoryview | bytes]:
    """A tensor's bytes: (numpy dtype, where they go, the bytes)."""
    if type(data) is np.ndarray and data.dtype.kind in _NUMERIC_KINDS:
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        try:
            return data.dtype.str, _INLINE, memoryview(data).cast("B")
        except (TypeError, ValueError):  # a 0-d array, or a format memoryview lacks
            return data.dtype.str, _INLINE, memoryview(data.reshape(-1).view(np.uint8))
    if isinstance(data, np.ndarray) and data.dtype == object:
        strings = _strings(data)
        if strings is not None:
            return None, _STRINGS, strings
    return None, _PICKLED, pickle.dumps(data, protocol=5)


def _frame(
    kind: int,
    seq: int,
    head: list[Any],
    tensors: list[Tensor],
    arena: Arena | None,
    threshold: int,
    plain: bool,
    extra: bytes = b"",
    slot: int = 0,
) -> bytes:
    """One frame: ``head`` and the tensors' entries as meta, their bytes inline or shared.

    ``plain``: ``head``'s parameters are plain JSON values (tensors' are checked here).
    """
    entries: list[list[Any]] = []
    inline: list[memoryview | bytes] = []
    shared: list[tuple[list[Any], memoryview | bytes]] = []
    offset = 0
    for tensor in tensors:
        data = tensor.data
        dtype, place, buffer = _buffer(data)
        parameters = tensor.parameters
        if parameters and plain and not _plain(parameters):
            plain = False
        shape = list(data.shape) if isinstance(data, np.ndarray) else None
        entry = [
            tensor.name,
            tensor.datatype,
            list(tensor.shape),
            parameters,
            dtype,
            place,
            0,
            0,
            shape,
        ]
        entries.append(entry)
        size = len(buffer)
        if arena is not None and place == _INLINE and size >= threshold:
            shared.append((entry, buffer))
            continue
        if offset % _ALIGN:
            pad = _ALIGN - offset % _ALIGN
            inline.append(bytes(pad))
            offset += pad
        entry[6], entry[7] = offset, size
        inline.append(buffer)
        offset += size
    if shared:
        assert arena is not None
        end = 0
        for _, buffer in shared:
            end = _aligned(end + len(buffer))
        room = arena.reserve(end)
        position = 0
        for entry, buffer in shared:
            if room:
                arena.put(position, memoryview(buffer))
                entry[5], entry[6], entry[7] = _SHARED, position, len(buffer)
                position = _aligned(position + len(buffer))
            else:  # /dev/shm is full: the frame carries them
                offset = _aligned(offset)
                entry[6], entry[7] = offset, len(buffer)
                inline.append(bytes(offset - sum(map(len, inline))))
                inline.append(buffer)
                offset += len(buffer)
    meta_object = [*head, entries]
    flags = 0
    meta = b""
    if plain:
        try:
            meta = orjson.dumps(meta_object)
        except TypeError:
            plain = False
    if not plain:
        meta, flags = pickle.dumps(meta_object, protocol=5), PICKLED_META
    start = HEADER.size + len(meta) + len(extra)
    padding = (_aligned(start) - start) if offset else 0
    header = HEADER.pack(start + padding + offset, kind, flags, slot, len(meta), len(extra), seq)
    return b"".join([header, meta, extra, bytes(padding), *inline])


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype


def _tensor_from(entry: Sequence[Any], frame: bytearray, data: int, arena: Arena | None) -> Tensor:
    name, datatype, shape, parameters, dtype, place, offset, length, array_shape = entry
    array: Any
    if place == _INLINE:
        numpy_type = _dtype(dtype)
        array = np.frombuffer(frame, numpy_type, length // numpy_type.itemsize, data + offset)
        if len(array_shape) != 1:
            array = array.reshape(array_shape)
    elif place == _SHARED:
        if arena is None:
            raise ValueError("frame refers to shared memory but this end has no arena")
        array = np.frombuffer(arena.take(offset, length), _dtype(dtype)).reshape(array_shape)
    elif place == _STRINGS:
        with memoryview(frame) as view:
            count = math.prod(array_shape)
            strings = _from_strings(view[data + offset : data + offset + length], count)
        array = strings.reshape(array_shape)
    else:
        with memoryview(frame) as view:
            array = pickle.loads(view[data + offset : data + offset + length])
    return Tensor(name, datatype, tuple(shape), array, parameters)


class _Parsed(NamedTuple):
    kind: int
    seq: int
    meta: list[Any]
    extra: bytes
    data: int


def _parse(frame: bytearray) -> _Parsed:
    total, kind, flags, _, meta_length, extra_length, seq = HEADER.unpack_from(frame)
    if total != len(frame):
        raise ValueError(f"frame of {len(frame)} bytes says it has {total}")
    start = HEADER.size
    end = start + meta_length
    raw = frame[start:end]  # a small copy, cheaper than a memoryview's bookkeeping
    meta = pickle.loads(raw) if flags & PICKLED_META else orjson.loads(raw)
    extra = bytes(frame[end : end + extra_length]) if extra_length else b""
    return _Parsed(kind, seq, meta, extra, _aligned(end + extra_length))


def frame_kind(frame: bytearray) -> int:
    """The kind byte of a frame's header (it follows the frame's length, a ``Q``)."""
    kind: int = frame[8]
    return kind


def frame_route(frame: bytearray) -> tuple[int, int]:
    """A frame's model slot and sequence number, from its header alone."""
    _, _, _, slot, _, _, seq = HEADER.unpack_from(frame)
    return slot, seq


def encode_request(
    request: InferenceRequest, seq: int, arena: Arena | None, threshold: int, slot: int = 0
) -> bytes:
    """Called in the parent: the frame of one request for the model of ``slot``."""
    parameters = request.parameters
    plain = not parameters or _plain(parameters)
    outputs = None
    if request.outputs is not None:
        outputs = [[out.name, out.parameters] for out in request.outputs]
        plain = plain and all(not p or _plain(p) for _, p in outputs)
    head = [request.id, parameters, outputs]
    return _frame(REQUEST, seq, head, request.inputs, arena, threshold, plain, slot=slot)


def decode_request(frame: bytearray, arena: Arena | None) -> tuple[int, InferenceRequest]:
    """Called in the worker: the sequence number and the request of a frame."""
    kind, seq, meta, _, data = _parse(frame)
    if kind != REQUEST:
        raise ValueError(f"expected a request frame, got kind {kind}")
    request_id, parameters, outputs, entries = meta
    inputs = [_tensor_from(entry, frame, data, arena) for entry in entries]
    requested = None if outputs is None else [RequestedOutput(n, p) for n, p in outputs]
    return seq, InferenceRequest(inputs, request_id, parameters, requested)


def encode_result(
    response: InferenceResponse,
    seq: int,
    updates: list[MetricUpdate],
    arena: Arena | None,
    threshold: int,
) -> bytes:
    """Called in the worker: the frame of a response (``updates``: custom metrics)."""
    parameters = response.parameters
    plain = not parameters or _plain(parameters)
    head = [response.model_name, response.model_version, response.id, parameters]
    extra = pickle.dumps(updates, protocol=5) if updates else b""
    return _frame(RESULT, seq, head, response.outputs, arena, threshold, plain, extra)


def encode_error(exc: Exception, seq: int, updates: list[MetricUpdate]) -> bytes:
    """Called in the worker: the frame of an error (never carries a traceback)."""
    return _frame(ERROR, seq, [error_to_wire(exc), updates], [], None, 0, False)


class Reply(NamedTuple):
    """A decoded reply: the response or the error, and the custom-metric updates."""

    seq: int
    outcome: InferenceResponse | V2MountError
    updates: list[MetricUpdate]


def decode_reply(frame: bytearray, arena: Arena | None) -> Reply:
    """Called in the parent."""
    kind, seq, meta, extra, data = _parse(frame)
    if kind == ERROR:
        wire, updates = meta[0], meta[1]
        return Reply(seq, error_from_wire(tuple(wire)), updates)
    if kind != RESULT:
        raise ValueError(f"expected a reply frame, got kind {kind}")
    model_name, model_version, response_id, parameters, entries = meta
    outputs = [_tensor_from(entry, frame, data, arena) for entry in entries]
    response = InferenceResponse(model_name, outputs, model_version, response_id, parameters)
    return Reply(seq, response, pickle.loads(extra) if extra else [])


def updates_of(frame: bytearray) -> list[MetricUpdate]:
    """The custom-metric updates of a reply nobody waits for any more."""
    kind, _, meta, extra, _ = _parse(frame)
    if kind == ERROR:
        return list(meta[1])
    return pickle.loads(extra) if extra else []


# -- the request channel's ends ---------------------------------------------------------


class Channel:
    """One end of a worker's request channel: whole frames out, whole frames in.

    ``write_some`` and ``read_some`` never block on a non-blocking descriptor: they return
    what they could not finish, and keep their place for the next call, so one frame may
    be written or read by several owners in turn (a request task, then the supervisor that
    drains the reply of a cancelled request). On a blocking descriptor (the worker's end),
    ``send`` and ``receive`` wait.
    """

    __slots__ = ("_buffer", "_got", "_out", "_pending", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._out: memoryview | None = None
        self._pending = b""
        self._buffer: bytearray | None = None
        self._got = 0

    @property
    def writing(self) -> bool:
        return self._out is not None

    @property
    def reading(self) -> bool:
        """A frame has been partly read."""
        return self._buffer is not None or bool(self._pending)

    def begin(self, frame: bytes) -> None:
        self._out = memoryview(frame)

    def write_some(self) -> bool:
        """Write what the pipe takes of the current frame; ``True`` once it is all out."""
        out = self._out
        if out is None:
            return True
        try:
            written = os.write(self.fd, out)
        except BlockingIOError:
            return False
        if written == len(out):
            self._out = None
            out.release()
            return True
        self._out = out[written:]
        return False

    def read_some(self) -> bytearray | None:
        """The next whole frame, or ``None`` if it has not all arrived (``EOFError`` at EOF)."""
        while True:
            buffer = self._buffer
            if buffer is None:
                try:
                    chunk = os.read(self.fd, _CHUNK)
                except BlockingIOError:
                    return None
                if not chunk:
                    raise EOFError
                pending = self._pending + chunk if self._pending else chunk
                if len(pending) < 8:
                    self._pending = pending
                    continue
                self._pending = b""
                (total,) = struct.unpack_from("<Q", pending)
                if len(pending) == total:
                    return bytearray(pending)
                if len(pending) > total or total < HEADER.size:
                    raise ValueError("a frame overran its length")
                buffer = self._buffer = bytearray(total)
                buffer[: len(pending)] = pending
                self._got = len(pending)
            with memoryview(buffer) as view:
                try:
                    got = os.readv(self.fd, [view[self._got :]])
                except BlockingIOError:
                    return None
            if not got:
                raise EOFError
            self._got += got
            if self._got == len(buffer):
                self._buffer, self._got = None, 0
                return buffer

    def send(self, frame: bytes) -> None:
        """Write a whole frame (blocking descriptor)."""
        self.begin(frame)
        while not self.write_some():
            pass

    def receive(self) -> bytearray:
        """Read a whole frame (blocking descriptor); ``EOFError`` at EOF."""
        while True:
            frame = self.read_some()
            if frame is not None:
                return frame


# -- errors ----------------------------------------------------------------------------------


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
