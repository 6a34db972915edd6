"""Hostile requests through a real uvicorn: each is a 4xx, and the server shrugs it off."""

from __future__ import annotations

import json
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import orjson
import pytest

pytestmark = pytest.mark.slow

LIMIT = 1 << 20
PATH = "/v2/models/echo/infer"
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(launch: Any, harness: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("hostile-repository")
    harness.write_model(
        repository, "echo", implementation="v2mount.demo.models.Identity", parallel_workers=0
    )
    return launch(repository, max_request_bytes=LIMIT)


def tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [1], "data": [1], **fields}


def body(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary(inputs: list[dict[str, Any]], tail: bytes, header: int | str | None = None) -> Any:
    """A binary-extension body; the tensors' ``data`` is dropped (their bytes are ``tail``)."""
    head = body(*({k: v for k, v in t.items() if k != "data"} for t in inputs))
    length = len(head) if header is None else header
    return {"content": head + tail, "headers": {HEADER: str(length)}}


def chunks(size: int) -> Iterator[bytes]:
    for _ in range(size // 65536 + 1):
        yield b" " * 65536


def bytes_element(item: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<I", len(item) if claimed is None else claimed) + item


#: (what, httpx keyword arguments, expected status)
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("body over the limit, with Content-Length", {"content": b" " * (2 * LIMIT)}, 413),
    ("body over the limit, chunked", {"content": chunks(2 * LIMIT)}, 413),
    ("empty body", {"content": b""}, 400),
    ("not JSON", {"content": b"\x00\x01garbage"}, 400),
    ("non-UTF-8 JSON", {"content": b'{"inputs": [{"name": "\xff\xfe"}]}'}, 400),
    ("100,000 nested brackets", {"content": b"[" * 100_000 + b"]" * 100_000}, 400),
    ("deep data nesting", {"content": body(tensor(data=[[[[[[[[[[1]]]]]]]]]] * 2))}, 400),
    ("shape claims 2^62 elements", {"content": body(tensor(shape=[2**31, 2**31]))}, 400),
    ("negative dimension", {"content": body(tensor(shape=[-1]))}, 400),
    ("shape and data disagree", {"content": body(tensor(shape=[3]))}, 400),
    ("unknown datatype", {"content": body(tensor(datatype="FP128"))}, 400),
    ("wrong element type", {"content": body(tensor(data=["one"]))}, 400),
    ("UINT8 out of range", {"content": body(tensor(datatype="UINT8", data=[256]))}, 400),
    ("NaN literal", {"content": body(tensor()).replace(b"[1]}", b"[NaN]}")}, 400),
    ("lone surrogate in BYTES", {"content": body(tensor(datatype="BYTES", data=["\udcff"]))}, 400),
    (
        "binary: 10^9 FP32 claimed, 4 bytes sent",
        binary([tensor(shape=[10**9], parameters={"binary_data_size": 4})], b"1234"),
        400,
    ),
    (
        "binary: BYTES shape 2^40, one element sent",
        binary(
            [tensor(datatype="BYTES", shape=[2**40], parameters={"binary_data_size": 5})],
            bytes_element(b"a"),
        ),
        400,
    ),
    (
        "binary: BYTES element length lies",
        binary(
            [tensor(datatype="BYTES", parameters={"binary_data_size": 5})],
            bytes_element(b"a", 2**32 - 1),
        ),
        400,
    ),
    (
        "binary: header length past the body",
        binary([tensor(parameters={"binary_data_size": 4})], b"1234", 10**6),
        400,
    ),
    ("binary: header length not a number", binary([tensor()], b"", "12abc"), 400),
    ("binary: header length inside the JSON", binary([tensor()], b"", 5), 400),
    (
        "binary: binary_data_size past the body",
        binary([tensor(parameters={"binary_data_size": 400})], b"1234"),
        400,
    ),
    (
        "binary: bytes left after the last tensor",
        binary([tensor(parameters={"binary_data_size": 4})], b"12345678"),
        400,
    ),
]


def test_hostile_requests_get_4xx(server: Any, figures: Any) -> None:
    statuses: Counter[int] = Counter()
    rss_before = server.rss_mb()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for what, request, expected in CASES:
            answer = client.post(PATH, **request)
            statuses[answer.status_code] += 1
            assert answer.status_code == expected, (what, answer.status_code, answer.text)
            assert orjson.loads(answer.content)["error"], what
        # Not HTTP at all: uvicorn answers, v2mount never sees it.
        for raw in (b"GARBAGE\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(raw)
                reply = sock.recv(100)
            statuses[int(reply.split()[1])] += 1
            assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post(PATH, content=body(tensor())).status_code == 200
    growth = server.rss_mb() - rss_before
    figures.add_statuses(
        "hostile input",
        "through uvicorn: oversized, malformed, lying binary framing, huge claimed shapes",
        statuses,
        notes=f"server RSS {growth:+.1f} MB after all of them; server still ready",
    )
    assert growth < 32, "a small request claiming a huge shape allocates nothing large"


def test_giant_headers_get_431(server: Any) -> None:
    valid = body(tensor())
    with httpx.Client(base_url=server.url, timeout=30) as client:
        one = client.post(PATH, content=valid, headers={"x-junk": "a" * 1_000_000})
        many = client.post(
            PATH, content=valid, headers=[(f"x-h{i}", "v" * 50) for i in range(5000)]
        )
        assert client.get("/v2/health/ready").status_code == 200
    for answer in (one, many):
        assert answer.status_code == 431, answer.status_code
        assert answer.json()["error"]
