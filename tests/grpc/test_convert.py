"""Parsing ``ModelInferRequest`` bytes: raw contents as views of the message, same result
as protobuf's own parser, malformed messages refused; raw outputs in wire order."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from v2mount.grpc._convert import (
    SPLIT_MIN_BYTES,
    decode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.types import InferenceResponse, Tensor


def request(*arrays: np.ndarray, id: str = "r") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", id=id)
    message.parameters["p"].string_param = "v"
    for index, array in enumerate(arrays):
        message.inputs.add(name=f"x{index}", datatype="FP32", shape=array.shape)
        message.raw_input_contents.append(array.tobytes())
    return message


def big(value: float) -> np.ndarray:
    return np.full(SPLIT_MIN_BYTES, value, dtype=np.float32)


@pytest.mark.parametrize("size", [4, SPLIT_MIN_BYTES])
def test_raw_inputs_are_views_of_the_message(size: int) -> None:
    arrays = (np.arange(size, dtype=np.float32), np.ones(3, dtype=np.float32))
    data = request(*arrays).SerializeToString()
    message, raw = parse_infer_request(data)
    assert not message.raw_input_contents or size < SPLIT_MIN_BYTES
    decoded = decode_infer_request(message, raw)
    assert decoded.id == "r"
    assert decoded.parameters == {"p": "v"}
    for tensor, array in zip(decoded.inputs, arrays, strict=True):
        assert tensor.data.tolist() == array.tolist()
    shares = np.shares_memory(decoded.inputs[0].data, np.frombuffer(data, np.uint8))
    assert shares == (size >= SPLIT_MIN_BYTES)


def test_fields_after_the_raw_contents_are_kept() -> None:
    """protobuf allows fields in any order: an id written after the raw contents."""
    head = request(big(1.0), id="").SerializeToString()
    tail = pb.ModelInferRequest(id="late").SerializeToString()
    message, raw = parse_infer_request(head + tail)
    assert message.id == "late"
    assert message.model_name == "m"
    assert len(raw) == 1 and len(raw[0]) == 4 * SPLIT_MIN_BYTES


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],  # the last raw entry runs past the end
        lambda data: data + b"\x3a\xff",  # a truncated length
        lambda data: data + b"\x0f",  # wire type 7 does not exist
        lambda data: data + b"\xff" * 11,  # a varint that never ends
    ],
)
def test_a_damaged_large_message_is_refused(damage: object) -> None:
    data = request(big(2.0)).SerializeToString()
    with pytest.raises(DecodeError):
        parse_infer_request(damage(data))  # type: ignore[operator]


def test_many_small_fields_are_left_to_protobuf() -> None:
    message = request(big(3.0))
    message.outputs.extend(
        pb.ModelInferRequest.InferRequestedOutputTensor(name="o") for _ in range(2000)
    )
    parsed, raw = parse_infer_request(message.SerializeToString())
    assert len(parsed.outputs) == 2000
    assert np.frombuffer(raw[0], np.float32)[0] == 3.0


@pytest.mark.parametrize("elements", [6, 4096])  # copied out (tobytes), or left a view
def test_raw_outputs_are_little_endian_c_order(elements: int) -> None:
    transposed = np.arange(elements, dtype=np.int32).reshape(2, -1).T  # not C-contiguous
    swapped = np.arange(elements, dtype=">f8")
    response = InferenceResponse(
        "m",
        [
            Tensor("t", "INT32", transposed.shape, transposed),
            Tensor("s", "FP64", swapped.shape, swapped),
        ],
    )
    message = pb.ModelInferResponse.FromString(b"".join(encode_infer_response(response, True)))
    assert [list(o.shape) for o in message.outputs] == [list(transposed.shape), [elements]]
    first, second = message.raw_output_contents
    assert first == np.ascontiguousarray(transposed).astype("<i4").tobytes()
    assert second == swapped.astype("<f8").tobytes()
