"""``InferenceResponse`` → HTTP body: plain JSON, or a JSON header plus binary outputs.

An output goes as binary when its requested-output entry says ``binary_data: true``, or
when the request's ``binary_data_output`` parameter is true and the entry does not say
otherwise (Triton's rules, see spec/NOTES.md §9).
"""

from __future__ import annotations

from typing import Any

import orjson

from v2mount.codecs.binary import encode_binary_tensor
from v2mount.codecs.tensor import encode_json_data
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["encode_response", "json_dumps"]
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_dumps(document: Any) -> bytes:
    """Serialise a JSON document; numpy arrays and scalars are written natively."""
    return orjson.dumps(document, option=_OPTIONS)


def _binary_names(request: InferenceRequest, output_names: list[str]) -> set[str]:
    default = request.parameters.get("binary_data_output") is True
    chosen = {name for name in output_names} if default else set()
    for requested in request.outputs or ():
        flag = requested.parameters.get("binary_data")
        if flag is True:
            chosen.add(requested.name)
        elif flag is False:
            chosen.discard(requested.name)
    return chosen


def encode_response(
    response: InferenceResponse, request: InferenceRequest
) -> tuple[bytes, int | None]:
    """The body, and the length of its JSON header when binary outputs follow it.

    A body with binary outputs goes as ``application/octet-stream`` with that length in
    ``Inference-Header-Content-Length``; one without is plain ``application/json``.
    """
    binary = _binary_names(request, [out.name for out in response.outputs])
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        document["model_version"] = response.model_version
    if response.id is not None:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for tensor in response.outputs:
        # orjson writes the shape tuple as a JSON array.
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        parameters = tensor.parameters
        if tensor.name in binary:
            chunk = encode_binary_tensor(tensor.data)
            chunks.append(chunk)
            size = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            parameters = {**parameters, "binary_data_size": size}
        else:
            entry["data"] = encode_json_data(tensor.data, tensor.name)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document["outputs"] = outputs
    header = json_dumps(document)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
