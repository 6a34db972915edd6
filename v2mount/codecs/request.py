"""HTTP body → ``InferenceRequest``: the JSON form and Triton's binary tensor extension.

The body is parsed as JSON unless an ``Inference-Header-Content-Length`` header says
where the JSON header ends and raw tensor bytes begin (Content-Type is not reliable:
tritonclient sends none). Every malformed body raises ``BadRequest``.
"""

from __future__ import annotations

from typing import Any

from v2mount.codecs.binary import decode_binary_tensor
from v2mount.codecs.fastjson import load_json
from v2mount.codecs.tensor import check_shape, datatype_to_dtype, decode_json_data
from v2mount.errors import BadRequest
from v2mount.types import InferenceRequest, Parameters, RequestedOutput, Tensor

__all__ = ["decode_request", "parse_header_length"]


def parse_header_length(raw: bytes | str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked against the body."""
    if raw is None:
        return None
    value = (raw.decode("latin-1") if isinstance(raw, bytes) else raw).strip()
    if not value.isdigit():
        raise BadRequest(
            f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}"
        )
    length = int(value)
    if length > body_length:
        raise BadRequest(
            f"Inference-Header-Content-Length {length} exceeds the body length {body_length}"
        )
    if length == 0:
        raise BadRequest("Inference-Header-Content-Length 0 (raw binary request) is not supported")
    return length


def _parameters(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be a JSON object")
    return value


def _name(item: dict[str, Any], field: str, index: int) -> str:
    name = item.get("name")
    if type(name) is not str or not name:  # the message only when it is needed
        raise BadRequest(f"{field}[{index}]: 'name' must be a non-empty string")
    return name


def decode_request(body: bytes, header_length: int | None = None) -> InferenceRequest:
    """Decode a whole request body (``header_length`` from ``parse_header_length``)."""
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    document = load_json(header)
    if not isinstance(document, dict):
        raise BadRequest("the request body must be a JSON object")

    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(document.get("parameters"), "request")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    offset = 0 if header_length is None else header_length
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{index}] must be a JSON object")
        name = _name(item, "inputs", index)
        where = f"input {name!r}"
        if name in seen:
            raise BadRequest(f"{where} appears more than once")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"{where}: 'datatype' must be a string")
        datatype_to_dtype(datatype)
        shape = check_shape(item.get("shape"), where)
        tensor_parameters = _parameters(item.get("parameters"), where)
        binary_size = tensor_parameters.get("binary_data_size")
        has_data = "data" in item
        if binary_size is not None:
            if has_data:
                raise BadRequest(f"{where} must set only one of 'data' and 'binary_data_size'")
            if header_length is None:
                raise BadRequest(
                    f"{where} has 'binary_data_size' but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if type(binary_size) is not int or binary_size < 0:
                raise BadRequest(f"{where}: 'binary_data_size' must be a non-negative integer")
            end = offset + binary_size
            if end > len(view):
                raise BadRequest(
                    f"{where}: binary_data_size {binary_size} runs past the end of the body"
                )
            data = decode_binary_tensor(view[offset:end], datatype, shape, where)
            offset = end
            tensor_parameters = {
                k: v for k, v in tensor_parameters.items() if k != "binary_data_size"
            }
        elif has_data:
            data = decode_json_data(item["data"], datatype, shape, where)
        else:
            raise BadRequest(f"{where} has no 'data'")
        inputs.append(Tensor(name, datatype, shape, data, tensor_parameters))
    if header_length is not None and offset != len(view):
        raise BadRequest(
            f"unexpected additional input data: {len(view) - offset} bytes after the last "
            "binary tensor"
        )

    outputs: list[RequestedOutput] | None = None
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for index, item in enumerate(raw_outputs):
            if not isinstance(item, dict):
                raise BadRequest(f"outputs[{index}] must be a JSON object")
            name = _name(item, "outputs", index)
            outputs.append(
                RequestedOutput(name, _parameters(item.get("parameters"), f"output {name!r}"))
            )
    return InferenceRequest(inputs, request_id, parameters, outputs)
