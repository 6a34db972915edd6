"""Triton's binary tensor extension through the ASGI app: framing, mixing, errors."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from v2mount import InferenceRequest, Model, V2App

pytestmark = pytest.mark.anyio


class Echo(Model):
    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


def make_app() -> V2App:
    return V2App([Echo()], model_parallel_workers=0)


def frame(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def split(body: bytes, header_length: int) -> tuple[dict[str, Any], bytes]:
    return orjson.loads(body[:header_length]), body[header_length:]


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


async def test_binary_in_binary_out_mixed_with_json(serve: Any) -> None:
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    words = [b"hi", b"", b"\xff\xfe"]
    header = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": floats.nbytes},
            },
            {"name": "j", "datatype": "INT64", "shape": [2], "data": [5, -5]},
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(bytes_tensor(words))},
            },
        ],
        "outputs": [
            {"name": "a", "parameters": {"binary_data": True}},
            {"name": "j"},
            {"name": "s", "parameters": {"binary_data": True}},
        ],
    }
    body, headers = frame(header, floats.tobytes(), bytes_tensor(words))
    async with serve(make_app()) as client:
        r = await client.post("/v2/models/echo/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["inference-header-content-length"])
    assert int(r.headers["content-length"]) == len(r.content)
    doc, rest = split(r.content, length)
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert "data" not in outputs["a"] and outputs["j"]["data"] == [5, -5]
    size_a = outputs["a"]["parameters"]["binary_data_size"]
    size_s = outputs["s"]["parameters"]["binary_data_size"]
    assert size_a == floats.nbytes and size_a + size_s == len(rest)
    np.testing.assert_array_equal(np.frombuffer(rest[:size_a], np.float32).reshape(2, 3), floats)
    assert rest[size_a:] == bytes_tensor(words)


async def test_binary_data_output_default_with_per_output_override(serve: Any) -> None:
    header = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]},
            {"name": "y", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        ],
    }
    async with serve(make_app()) as client:
        r = await client.post("/v2/models/echo/infer", content=orjson.dumps(header))
        doc, rest = split(r.content, int(r.headers["inference-header-content-length"]))
        assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [8, 2]
        assert rest == struct.pack("<ii", 1, 2) + b"\x01\x00"
        header["outputs"] = [{"name": "x", "parameters": {"binary_data": False}}]
        r = await client.post("/v2/models/echo/infer", content=orjson.dumps(header))
        assert r.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in r.headers
        assert r.json()["outputs"][0]["data"] == [1, 2]


def _binary_header(
    size: int, shape: list[int] | None = None, datatype: str = "FP32"
) -> dict[str, Any]:
    """A request whose one input ``x`` claims ``size`` bytes of binary data."""
    return {
        "inputs": [
            {
                "name": "x",
                "datatype": datatype,
                "shape": shape or [2],
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def _bad_cases() -> list[tuple[str, bytes, dict[str, str], str]]:
    head = orjson.dumps(_binary_header(8))
    cases = [
        (
            "header past body",
            head + b"\0" * 8,
            {"Inference-Header-Content-Length": "9999"},
            "exceeds the body length",
        ),
        (
            "header not int",
            head + b"\0" * 8,
            {"Inference-Header-Content-Length": "abc"},
            "non-negative integer",
        ),
        (
            "header negative",
            head + b"\0" * 8,
            {"Inference-Header-Content-Length": "-1"},
            "non-negative integer",
        ),
        (
            "header cut mid json",
            head + b"\0" * 8,
            {"Inference-Header-Content-Length": str(len(head) - 3)},
            "malformed JSON",
        ),
    ]
    for name, header, tail, message in (
        ("size past end", _binary_header(16), b"\0" * 8, "runs past the end"),
        ("size vs shape", _binary_header(8, [3]), b"\0" * 8, "needs 12"),
        ("extra bytes", _binary_header(8), b"\0" * 12, "unexpected additional input data"),
        (
            "data and size",
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2],
                        "data": [1, 2],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\0" * 8,
            "only one of",
        ),
        ("negative size", _binary_header(-8), b"", "non-negative integer"),
        (
            "bool bytes",
            _binary_header(2, [2], "BOOL"),
            b"\x01\x07",
            "0x00 or 0x01",
        ),
        (
            "bytes truncated",
            _binary_header(6, [1], "BYTES"),
            struct.pack("<I", 10) + b"ab",
            "runs past its chunk",
        ),
        (
            "bytes count",
            _binary_header(5, [3], "BYTES"),
            struct.pack("<I", 1) + b"a",
            "holds 1 elements, shape needs 3",
        ),
        (
            "bytes short length",
            _binary_header(2, [1], "BYTES"),
            b"\x01\x00",
            "truncated BYTES element length",
        ),
    ):
        encoded = orjson.dumps(header)
        cases.append(
            (name, encoded + tail, {"Inference-Header-Content-Length": str(len(encoded))}, message)
        )
    # A shape claiming a huge tensor with a tiny body must not allocate anything.
    huge = orjson.dumps(_binary_header(8, [2**40]))
    cases.append(
        (
            "huge shape",
            huge + b"\0" * 8,
            {"Inference-Header-Content-Length": str(len(huge))},
            "needs",
        )
    )
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize(("case", "body", "headers", "message"), BAD, ids=[c[0] for c in BAD])
async def test_bad_framing_is_400(
    serve: Any, case: str, body: bytes, headers: dict[str, str], message: str
) -> None:
    async with serve(make_app()) as client:
        r = await client.post("/v2/models/echo/infer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert (await client.get("/v2/health/ready")).status_code == 200


async def test_empty_binary_tensor(serve: Any) -> None:
    body, headers = frame(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [0, 3],
                    "parameters": {"binary_data_size": 0},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    async with serve(make_app()) as client:
        r = await client.post("/v2/models/echo/infer", content=body, headers=headers)
    doc, rest = split(r.content, int(r.headers["inference-header-content-length"]))
    assert doc["outputs"][0]["shape"] == [0, 3] and rest == b""
