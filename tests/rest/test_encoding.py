"""Content codings on the REST routes: compressed request bodies in, compressed answers out.

Hostile bodies included: a zip bomb is refused once it inflates past the size limit
(without ever holding more than that), garbage and truncated streams are 400s, an
unknown coding is a 415 naming it; the server stays healthy after each.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Mount

from v2mount import InferenceRequest, Model, V2App
from v2mount.errors import BadRequest, PayloadTooLarge
from v2mount.rest.encoding import COMPRESS_MIN_BYTES, Inflater, response_coding

pytestmark = pytest.mark.anyio

INFER = "/v2/models/echo/infer"
GZIP_BODY = {"content-encoding": "gzip"}


class Echo(Model):
    name = "echo"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


def body(values: int = 4) -> bytes:
    data = np.arange(values, dtype=np.float32).tolist()
    return orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [values], "data": data}]}
    )


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def bomb(size: int, wbits: int = 31) -> bytes:
    """``size`` zero bytes, compressed (a thousandfold smaller)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1024 * 1024)
    parts = [packer.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join([*parts, packer.flush()])


def app(**overrides: Any) -> V2App:
    return V2App([Echo()], model_parallel_workers=0, **overrides)


async def healthy(client: Any) -> None:
    r = await client.post(INFER, content=body())
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # the zlib stream RFC 9110 means by "deflate"
        ("deflate", raw_deflate),  # a bare deflate stream, as some clients send
        ("identity", lambda data: data),
    ],
)
async def test_compressed_request_bodies_are_inflated(serve: Any, coding: str, pack: Any) -> None:
    async with serve(app()) as client:
        r = await client.post(INFER, content=pack(body(8)), headers={"content-encoding": coding})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == list(map(float, range(8)))


async def test_gzip_members_back_to_back_are_one_body(serve: Any) -> None:
    whole = body(8)
    packed = gzip.compress(whole[:20]) + gzip.compress(whole[20:])
    async with serve(app()) as client:
        r = await client.post(INFER, content=packed, headers={"content-encoding": "gzip"})
        assert r.status_code == 200, r.text


async def test_binary_extension_body_compressed(serve: Any) -> None:
    """Inference-Header-Content-Length counts the inflated body, as tritonclient sends."""
    x = np.arange(6, dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [6],
                    "parameters": {"binary_data_size": 24},
                }
            ],
            "outputs": [{"name": "x", "parameters": {"binary_data": True}}],
        }
    )
    headers = {"content-encoding": "gzip", "inference-header-content-length": str(len(header))}
    async with serve(app()) as client:
        r = await client.post(INFER, content=gzip.compress(header + x.tobytes()), headers=headers)
        assert r.status_code == 200, r.text
        length = int(r.headers["inference-header-content-length"])
        np.testing.assert_array_equal(np.frombuffer(r.content[length:], np.float32), x)


async def test_a_zip_bomb_is_413_once_inflated_past_the_limit(serve: Any) -> None:
    packed = bomb(64 * 1024 * 1024)
    assert len(packed) < 100_000
    async with serve(app(max_request_bytes=1024 * 1024)) as client:
        for coding, data in (("gzip", packed), ("deflate", bomb(64 * 1024 * 1024, 15))):
            r = await client.post(INFER, content=data, headers={"content-encoding": coding})
            assert r.status_code == 413, r.text
            assert r.json() == {
                "error": "request body exceeds the 1048576-byte limit once decompressed"
            }
        await healthy(client)


def test_inflating_a_bomb_never_holds_more_than_the_limit() -> None:
    packed = bomb(256 * 1024 * 1024)
    limit = 2 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            Inflater(packed, "gzip", limit).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit  # 256 MiB inflated in one go would need all of it


def test_inflating_in_steps_stops_at_the_budget() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    inflater = Inflater(gzip.compress(data), "gzip", 10 * len(data))
    assert not inflater.run(100_000)
    assert inflater.run()
    assert inflater.result() == data


@pytest.mark.parametrize(
    ("coding", "data", "error"),
    [
        ("gzip", b"this is not gzip at all", "request body is not valid gzip data"),
        ("deflate", b"\x78\x9c garbage", "request body is not valid deflate data"),
        ("gzip", gzip.compress(body())[:-12], "request body is truncated gzip data"),
        ("deflate", zlib.compress(body()) + b"junk", "4 bytes of data after the end"),
    ],
)
async def test_broken_compressed_bodies_are_400(
    serve: Any, coding: str, data: bytes, error: str
) -> None:
    async with serve(app()) as client:
        r = await client.post(INFER, content=data, headers={"content-encoding": coding})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(error)
        await healthy(client)


async def test_an_unsupported_coding_is_415_naming_it(serve: Any) -> None:
    async with serve(app()) as client:
        for coding in ("br", "gzip, br", "compress"):
            r = await client.post(INFER, content=body(), headers={"content-encoding": coding})
            assert r.status_code == 415
            assert r.json() == {
                "error": f"Content-Encoding {coding!r} is not supported; "
                "send gzip, deflate or identity"
            }
        await healthy(client)


async def test_the_wire_size_limit_still_applies_before_inflating(serve: Any) -> None:
    packed = gzip.compress(np.random.default_rng(0).bytes(4096))  # incompressible
    async with serve(app(max_request_bytes=1024)) as client:
        r = await client.post(INFER, content=packed, headers={"content-encoding": "gzip"})
        assert r.status_code == 413
        assert "once decompressed" not in r.json()["error"]


async def test_other_routes_with_a_body_inflate_it_too(serve: Any) -> None:
    async with serve(app()) as client:
        r = await client.post(
            "/v2/repository/index",
            content=gzip.compress(b'{"ready": true}'),
            headers={"content-encoding": "gzip"},
        )
        assert r.status_code == 200
        assert [entry["name"] for entry in r.json()] == ["echo"]
        r = await client.post(
            "/v2/repository/index", content=b"{}", headers={"content-encoding": "br"}
        )
        assert r.status_code == 415


@pytest.mark.parametrize(
    ("accept", "coding"),
    [("gzip", "gzip"), ("deflate", "deflate"), ("gzip;q=0.5, deflate", "deflate")],
)
async def test_large_answers_are_compressed_as_accepted(
    serve: Any, accept: str, coding: str
) -> None:
    async with serve(app()) as client:
        r = await client.post(INFER, content=body(1000), headers={"accept-encoding": accept})
        assert r.status_code == 200
        # httpx inflates by Content-Encoding; the raw stream is what went over the wire.
        assert r.headers["content-encoding"] == coding
        assert r.headers["vary"] == "Accept-Encoding"
        assert int(r.headers["content-length"]) < len(r.content)
        assert r.json()["outputs"][0]["data"] == list(map(float, range(1000)))


async def test_small_answers_and_refused_codings_go_plain(serve: Any) -> None:
    async with serve(app()) as client:
        r = await client.post(INFER, content=body(4), headers={"accept-encoding": "gzip"})
        assert len(r.content) < COMPRESS_MIN_BYTES
        assert "content-encoding" not in r.headers
        for accept in ("identity", "br", "gzip;q=0", "deflate;q=0, gzip;q=0"):
            r = await client.post(INFER, content=body(1000), headers={"accept-encoding": accept})
            assert r.status_code == 200
            assert "content-encoding" not in r.headers, accept


async def test_compression_can_be_turned_off(serve: Any) -> None:
    async with serve(app(compress_responses=False)) as client:
        r = await client.post(INFER, content=body(1000), headers={"accept-encoding": "gzip"})
        assert r.status_code == 200
        assert "content-encoding" not in r.headers and "vary" not in r.headers
        assert int(r.headers["content-length"]) == len(r.content) > COMPRESS_MIN_BYTES
        assert r.json()["outputs"][0]["data"] == list(map(float, range(1000)))
        # Compressed request bodies are still read.
        r = await client.post(INFER, content=gzip.compress(body()), headers=GZIP_BODY)
        assert r.status_code == 200, r.text


def test_response_coding_choice() -> None:
    assert response_coding(None) is None
    assert response_coding(b"") is None
    assert response_coding(b"gzip, deflate") == "gzip"
    assert response_coding(b"deflate, gzip") == "gzip"  # a tie goes to gzip
    assert response_coding(b"deflate;q=1.0, gzip;q=0.9") == "deflate"
    assert response_coding(b"*") == "gzip"
    assert response_coding(b"br, *;q=0.1") == "gzip"
    assert response_coding(b"gzip;q=bad, deflate") == "deflate"
    assert response_coding(b"br, zstd") is None


def test_inflater_errors_are_client_errors() -> None:
    with pytest.raises(BadRequest):
        Inflater(b"garbage", "gzip", 100).run()
    with pytest.raises(PayloadTooLarge):
        Inflater(gzip.compress(bytes(101)), "gzip", 100).run()
    assert Inflater(gzip.compress(bytes(100)), "gzip", 100).run()


async def test_a_host_gzip_middleware_does_not_compress_twice() -> None:
    v2app = app()
    host = Starlette(
        routes=[Mount("/ml", v2app)], middleware=[Middleware(GZipMiddleware, minimum_size=10)]
    )
    async with v2app.lifespan():
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
            r = await client.post(
                "/ml" + INFER, content=body(1000), headers={"accept-encoding": "gzip"}
            )
            assert r.status_code == 200
            assert r.headers["content-encoding"] == "gzip"
            assert r.json()["outputs"][0]["data"] == list(map(float, range(1000)))
            r = await client.get("/ml/v2/models/echo", headers={"accept-encoding": "gzip"})
            assert r.headers["content-encoding"] == "gzip"  # the host's own, elsewhere
            assert r.json()["name"] == "echo"
