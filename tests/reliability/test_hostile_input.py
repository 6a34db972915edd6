"""Garbage in: every malformed body is a 4xx with an error, never a 5xx or a crash."""

from __future__ import annotations

import json
import struct
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v2mount import InferenceRequest, Model, V2App
from v2mount.codecs.request import decode_request, parse_header_length
from v2mount.errors import BadRequest
from v2mount.types import DATATYPES

pytestmark = pytest.mark.slow

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
datatypes = st.sampled_from([*DATATYPES, "FLOAT", "fp32", "", "BF16"])
shapes = st.lists(st.integers(min_value=-3, max_value=2**62) | json_scalars, max_size=4)
tensors = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4) | json_scalars,
        "datatype": datatypes | json_scalars,
        "shape": shapes | json_values,
    },
    optional={
        "data": json_values,
        "parameters": json_values
        | st.fixed_dictionaries(
            {"binary_data_size": st.integers(min_value=-5, max_value=64) | json_scalars}
        ),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": json_scalars,
        "parameters": json_values,
        "inputs": st.lists(tensors, max_size=3) | json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": json_scalars}), max_size=2)
        | json_values,
    },
)


def _decode(body: bytes, header: str | None) -> None:
    try:
        decode_request(body, parse_header_length(header, len(body)))
    except BadRequest as exc:
        assert exc.message
    except RecursionError:  # pragma: no cover - would be a bug
        raise


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_json_documents_decode_or_bad_request(document: dict[str, Any]) -> None:
    _decode(json.dumps(document).encode(), None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_bad_request(body: bytes) -> None:
    _decode(body, None)


@settings(max_examples=300, deadline=None)
@given(documents, st.binary(max_size=64), st.integers(min_value=-2, max_value=400))
def test_binary_framing_decode_or_bad_request(
    document: dict[str, Any], tail: bytes, header_delta: int
) -> None:
    head = json.dumps(document).encode()
    _decode(head + tail, str(max(0, len(head) + header_delta)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=6), max_size=5), st.integers(0, 8))
def test_binary_bytes_tensors(items: list[bytes], claimed: int) -> None:
    chunk = b"".join(struct.pack("<I", len(i)) + i for i in items)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [claimed],
                    "parameters": {"binary_data_size": len(chunk)},
                }
            ]
        }
    )
    try:
        request = decode_request(header + chunk, len(header))
    except BadRequest:
        assert claimed != len(items)
    else:
        assert request["s"].tolist() == items


def test_deep_nesting_is_400() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + deep + b"}]}"
    with pytest.raises(BadRequest):
        decode_request(body)
    nested = b"[" * 200 + b"1" + b"]" * 200
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + nested + b"}]}"
    with pytest.raises(BadRequest):
        decode_request(body)


def test_non_utf8_json_is_400() -> None:
    with pytest.raises(BadRequest):
        decode_request(b'{"inputs": [{"name": "\xff\xfe", "datatype": "BYTES"}]}')


class Echo(Model):
    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


@pytest.mark.anyio
async def test_app_answers_garbage_with_4xx(serve: Any) -> None:
    garbage = [
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"{}",
        b'{"inputs": null}',
        b"\x00\x01\x02",
        b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
        b'{"inputs": [{"name": "x", "datatype": "FP16", "shape": [1], "data": [1e10]}]}',
        b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": ["yes"]}]}',
        b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [{"a": 1}]}]}',
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [true], "data": [1]}]}',
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
    ]
    async with serve(V2App([Echo()], model_parallel_workers=0)) as client:
        for body in garbage:
            r = await client.post("/v2/models/echo/infer", content=body)
            assert 400 <= r.status_code < 500 or r.status_code == 200, (body, r.text)
            if r.status_code != 200:
                assert r.json()["error"]
        huge_header = {"x-junk": "a" * 60_000}
        r = await client.post("/v2/models/echo/infer", content=b"{}", headers=huge_header)
        assert r.status_code == 400
        assert (await client.get("/v2/health/ready")).status_code == 200


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(
    "shape", [[0, 2**62], [0, 2**63 - 1], [0] * 65, [1] * 65], ids=["2^62", "2^63", "65x0", "65x1"]
)
def test_shapes_numpy_cannot_hold_are_400(shape: list[int], binary: bool) -> None:
    count = 0 if 0 in shape else 1
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": shape}
    if binary:
        tensor["parameters"] = {"binary_data_size": 4 * count}
        head = json.dumps({"inputs": [tensor]}).encode()
        body, header = head + b"\0" * 4 * count, len(head)
    else:
        tensor["data"] = [1.0] * count
        body, header = json.dumps({"inputs": [tensor]}).encode(), None
    with pytest.raises(BadRequest):
        decode_request(body, header)
