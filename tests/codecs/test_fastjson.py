"""Large JSON bodies take the simdjson path; they must decode exactly like small ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from v2mount.codecs.fastjson import LARGE_JSON_BYTES
from v2mount.codecs.request import decode_request
from v2mount.errors import BadRequest

N = LARGE_JSON_BYTES // 2  # enough elements to push any body past the threshold


def body(datatype: str, data: list[Any], shape: list[int] | None = None) -> bytes:
    document = {
        "id": "big",
        "parameters": {"p": [1, 2]},
        "inputs": [
            {
                "name": "t",
                "datatype": datatype,
                "shape": shape or [len(data)],
                "data": data,
                "parameters": {"k": "v"},
            }
        ],
        "outputs": [{"name": "t"}],
    }
    encoded = orjson.dumps(document)
    assert len(encoded) >= LARGE_JSON_BYTES
    return encoded


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", [0.1, -2.5, 3.0, 1e-7]),
        ("FP64", [0.1, -2.5, 1e300, 5e-324]),
        ("INT64", [-9223372036854775808, 9007199254740993, 0, 9223372036854775807]),
        ("UINT64", [18446744073709551615, 9007199254740993, 0, 1]),
        ("INT8", [-128, 127, 0, 1]),
        ("UINT16", [0, 65535, 1, 2]),
        ("BOOL", [True, False, True, False]),
        ("BYTES", ["a", "bé", "", "日本"]),
    ],
)
def test_large_body_decodes_exactly(datatype: str, values: list[Any]) -> None:
    data = values * (N // len(values))
    request = decode_request(body(datatype, data))
    tensor = request.input("t")
    assert (request.id, request.parameters, tensor.parameters) == ("big", {"p": [1, 2]}, {"k": "v"})
    assert request.requested_output_names == ["t"]
    if datatype == "BYTES":
        assert tensor.data.tolist() == [v.encode() for v in data]
    else:
        expected = np.array(data, dtype=tensor.data.dtype)
        np.testing.assert_array_equal(tensor.data, expected)
        assert tensor.data.flags.writeable


def test_large_nested_body_reshapes() -> None:
    rows = [[float(i), float(i + 1)] for i in range(N // 2)]
    request = decode_request(body("FP32", rows, shape=[N // 2, 2]))  # type: ignore[arg-type]
    assert request["t"].shape == (N // 2, 2)
    assert request["t"][3].tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("datatype", "bad", "message"),
    [
        ("FP32", "x", "not valid FP32"),
        ("UINT8", 256, "not valid UINT8"),
        ("INT32", -(2**40), "not valid INT32"),
    ],
)
def test_large_body_bad_elements_are_400(datatype: str, bad: Any, message: str) -> None:
    data: list[Any] = [1] * N
    data[-1] = bad
    with pytest.raises(BadRequest, match=message):
        decode_request(body(datatype, data))


def test_large_body_size_mismatch() -> None:
    with pytest.raises(BadRequest, match="needs"):
        decode_request(body("FP32", [1.0] * N, shape=[N + 1]))


def test_large_malformed_json() -> None:
    with pytest.raises(BadRequest, match="malformed JSON"):
        decode_request(body("FP32", [1.0] * N)[:-2])


def test_parser_reuse_survives_live_proxies() -> None:
    from v2mount.codecs.fastjson import load_json

    first = load_json(body("FP32", [1.0] * N))
    kept = first["inputs"][0]["data"]  # a live proxy of the thread's parser
    second = decode_request(body("INT32", [2] * N))
    assert second["t"][0] == 2
    assert kept.as_list()[0] == 1.0
