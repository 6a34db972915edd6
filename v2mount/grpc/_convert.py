"""Protobuf ``ModelInferRequest`` ⇄ ``InferenceRequest``, ``InferenceResponse`` ⇄ bytes.

Tensor data comes either as ``raw_input_contents`` (one byte string per input, in the
binary tensor extension's encoding: decoded with the same codec, as read-only numpy
views of the received message's bytes where alignment allows, see
``parse_infer_request``) or as typed ``contents``. A response uses
``raw_output_contents`` when its request used raw inputs (as MLServer and Triton's
clients expect) or when an output has no typed field (FP16), else typed ``contents``.
The raw outputs are appended to the serialised response as wire-format fields, so a
large array is copied once, into the message, not twice.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from v2mount.codecs.binary import decode_binary_tensor, encode_binary_tensor
from v2mount.codecs.tensor import check_shape, datatype_to_dtype
from v2mount.errors import BadRequest
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.types import InferenceRequest, InferenceResponse, Parameters, RequestedOutput, Tensor

__all__ = ["decode_infer_request", "encode_infer_response", "parse_infer_request"]

#: The typed ``InferTensorContents`` field of each datatype, and the dtype it holds.
_CONTENTS: dict[str, tuple[str, np.dtype[Any]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_DOUBLE = struct.Struct("<d")
_UINT64 = struct.Struct("<Q")
#: ``raw_output_contents`` is field 6 of ``ModelInferResponse``, length-delimited.
_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])
#: ``raw_input_contents`` is field 7 of ``ModelInferRequest``.
_RAW_INPUT_FIELD = 7
#: Below this size a request is parsed by protobuf alone: copies of it cost little.
SPLIT_MIN_BYTES = 64 * 1024
#: A message with more top-level fields than this is left to protobuf's C parser.
_SPLIT_MAX_FIELDS = 1024
#: Below this size an output's raw bytes are copied out (``tobytes``): cheaper than a view.
_COPY_MAX_BYTES = 4096

#: Each input's raw contents: views of the received message, or protobuf's own bytes.
RawContents = Sequence[bytes | memoryview]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_infer_request(data: bytes) -> tuple[pb.ModelInferRequest, RawContents]:
    """Parse a serialised ``ModelInferRequest``, its raw input contents left in ``data``.

    protobuf would copy each ``raw_input_contents`` entry twice (into its arena, then
    into a new ``bytes`` on access); for a large message the top-level fields are walked
    here instead, the raw entries kept as views of ``data`` and the rest parsed by
    protobuf. A small message is protobuf's alone, its raw entries read from it.
    ``DecodeError`` when the message is malformed.
    """
    if len(data) < SPLIT_MIN_BYTES:
        message = pb.ModelInferRequest.FromString(data)
        return message, message.raw_input_contents
    view = memoryview(data)
    raws: list[memoryview] = []
    kept: list[memoryview] = []
    pos = kept_from = 0
    for _ in range(_SPLIT_MAX_FIELDS):
        if pos >= len(data):
            break
        start = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            pos = _read_varint(data, pos)[1]
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if key >> 3 == _RAW_INPUT_FIELD and pos + length <= len(data):
                kept.append(view[kept_from:start])
                raws.append(view[pos : pos + length])
                kept_from = pos + length
            pos += length
        else:
            raise DecodeError(f"unexpected wire type {wire}")
        if pos > len(data):
            raise DecodeError("truncated message")
    else:
        message = pb.ModelInferRequest.FromString(data)  # too many fields: let C walk them
        return message, message.raw_input_contents
    kept.append(view[kept_from:])
    return pb.ModelInferRequest.FromString(b"".join(kept)), raws


def _triton_parameter(value: pb.InferParameter) -> float | int | None:
    """Triton's ``double_param`` (4) or ``uint64_param`` (5), which the spec's proto lacks
    (``tritonclient`` sends a Python float as a double), from the unknown fields."""
    fields = UnknownFieldSet(value)
    for index in range(len(fields)):
        field = fields[index]
        if field.field_number == 4 and field.wire_type == 1:
            return float(_DOUBLE.unpack(_UINT64.pack(field.data))[0])
        if field.field_number == 5 and field.wire_type == 0:
            return int(field.data)
    return None


def _parameters(entries: Any) -> Parameters:
    parameters: Parameters = {}
    if not entries:  # the usual case, and iterating an empty map costs more than this
        return parameters
    for key, value in entries.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            parameters[key] = getattr(value, kind)
        else:
            extra = _triton_parameter(value)
            if extra is not None:
                parameters[key] = extra
    return parameters


def _set_parameters(message: Any, parameters: Parameters) -> None:
    if not parameters:
        return
    target = message.parameters
    for key, value in parameters.items():
        entry = target[key]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            entry.int64_param = value
        else:  # the spec's InferParameter has no double: floats and the rest go as text
            entry.string_param = value if isinstance(value, str) else str(value)


def _typed(
    contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], where: str
) -> Any:
    entry = _CONTENTS.get(datatype)
    if entry is None:
        raise BadRequest(f"{where}: {datatype} data must be sent in raw_input_contents")
    field, wide = entry
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise BadRequest(
                f"{where}: {datatype} data belongs in '{field}', not '{descriptor.name}'"
            )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"{where}: shape {list(shape)} needs {count} elements, got {len(values)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.fromiter(values, dtype=wide, count=count)
    dtype = datatype_to_dtype(datatype)
    if dtype != wide:
        info = np.iinfo(dtype)
        if count and (int(array.min()) < info.min or int(array.max()) > info.max):
            raise BadRequest(f"{where}: a value is out of range for {datatype}")
        array = array.astype(dtype)
    return array.reshape(shape)


def decode_infer_request(message: pb.ModelInferRequest, raw: RawContents) -> InferenceRequest:
    """The ``InferenceRequest`` a ``ModelInferRequest`` carries; ``BadRequest`` if malformed.

    ``raw`` is its raw input contents, as ``parse_infer_request`` returns them.
    """
    items = message.inputs
    if not items:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    if raw and len(raw) != len(items):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(items)} inputs; "
            "when used, it must hold every input"
        )
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        name = item.name
        if not name:
            raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
        where = f"input {name!r}"
        if name in seen:
            raise BadRequest(f"{where} appears more than once")
        seen.add(name)
        datatype = item.datatype
        datatype_to_dtype(datatype)
        shape = check_shape(item.shape[:], where)  # a slice is a list, built in C
        if raw:
            if item.HasField("contents"):
                raise BadRequest(
                    f"{where} sets 'contents' while the request uses raw_input_contents"
                )
            data = decode_binary_tensor(raw[index], datatype, shape, where)
        else:
            data = _typed(item.contents, datatype, shape, where)
        inputs.append(Tensor(name, datatype, shape, data, _parameters(item.parameters)))
    outputs: list[RequestedOutput] | None = None
    requested_outputs = message.outputs
    if requested_outputs:
        outputs = []
        for index, requested in enumerate(requested_outputs):
            if not requested.name:
                raise BadRequest(f"outputs[{index}]: 'name' must be a non-empty string")
            outputs.append(RequestedOutput(requested.name, _parameters(requested.parameters)))
    return InferenceRequest(
        inputs,
        message.id or None,
        _parameters(message.parameters),
        outputs,
    )


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_infer_response(response: InferenceResponse, raw: bool) -> list[bytes | memoryview]:
    """The serialised ``ModelInferResponse``, in pieces to join (raw outputs uncopied)."""
    if not raw:
        raw = any(tensor.datatype not in _CONTENTS for tensor in response.outputs)
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    _set_parameters(message, response.parameters)
    pieces: list[bytes | memoryview] = []
    for tensor in response.outputs:
        output = message.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
        )
        _set_parameters(output, tensor.parameters)
        if raw:
            data = tensor.data
            chunk: bytes | memoryview
            if (
                data.nbytes <= _COPY_MAX_BYTES
                and data.dtype.kind != "O"
                and data.dtype.byteorder != ">"
            ):
                chunk = data.tobytes()  # C order, as encode_binary_tensor's view
            else:
                chunk = encode_binary_tensor(data)
            size = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            pieces += (_RAW_OUTPUT_TAG, _varint(size), chunk)
        else:
            field = _CONTENTS[tensor.datatype][0]
            getattr(output.contents, field).extend(tensor.data.reshape(-1).tolist())
    return [message.SerializeToString(), *pieces]
