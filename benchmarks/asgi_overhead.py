"""The CPU one inference costs v2mount's ASGI app, without sockets or an HTTP parser.

Calls the app directly with a prepared scope, a ``receive`` that hands over the whole
body at once and a ``send`` that drops the answer, on uvloop, one request after the
other, and prints CPU microseconds per request (``time.process_time``) for:

- ``bare``: a plain ASGI function doing the irreducible work (orjson parse, numpy array,
  predict, orjson dump, two ``send`` calls): the floor;
- ``v2app``: ``V2App`` serving the same model in-process (inline predict);
- ``mounted``: the same ``V2App`` mounted under ``/ml`` in a Starlette host;
- ``binary``: ``V2App`` with the request and the answer in the binary tensor extension.

The model is a small numpy computation (a 4 → 3 matrix product and argmax), so the
figures are the framework's own cost. The minimum of ``--reps`` repetitions is printed:
on a shared machine the minimum is the figure least disturbed by other processes.

    python -m benchmarks.asgi_overhead            # ≈ 20 s
    python -m benchmarks.asgi_overhead -n 20000 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.routing import Mount

from v2mount import InferenceRequest, Model, V2App

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
BODY = orjson.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [5.9, 3.0, 5.1, 1.8]}]}
)
BINARY_HEADER = orjson.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 4],
                "parameters": {"binary_data_size": 16},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
)
BINARY_BODY = BINARY_HEADER + np.array([5.9, 3.0, 5.1, 1.8], dtype=np.float32).tobytes()


class Tiny(Model):
    name = "tiny"

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"predict": np.argmax(payload["x"] @ WEIGHTS, axis=1)}


async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    message = await receive()
    document = orjson.loads(message["body"])
    item = document["inputs"][0]
    x = np.array(item["data"], dtype=np.float32).reshape(item["shape"])
    y = np.argmax(x @ WEIGHTS, axis=1)
    out = orjson.dumps(
        {
            "model_name": "tiny",
            "outputs": [{"name": "predict", "datatype": "INT64", "shape": [1], "data": y}],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


def _scope(path: str, body: bytes, extra: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench"),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            *extra,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _run(
    app: ASGI, path: str, body: bytes, n: int, extra: list[tuple[bytes, bytes]]
) -> float:
    statuses: list[int] = []
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            statuses.append(event["status"])

    for _ in range(200):  # warm-up: the inline policy switches on after its warm-up calls
        await app(_scope(path, body, extra), receive, send)
    scopes = [_scope(path, body, extra) for _ in range(n)]
    statuses.clear()
    start = time.process_time()
    for scope in scopes:
        await app(scope, receive, send)
    elapsed = time.process_time() - start
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    return elapsed / n * 1e6


async def main(n: int, reps: int) -> None:
    v2app = V2App([Tiny()], model_parallel_workers=0)
    host = Starlette(routes=[Mount("/ml", v2app)])
    binary = [(b"inference-header-content-length", str(len(BINARY_HEADER)).encode())]
    cases: list[tuple[str, ASGI, str, bytes, list[tuple[bytes, bytes]]]] = [
        ("bare", bare, "/v2/models/tiny/infer", BODY, []),
        ("v2app", v2app, "/v2/models/tiny/infer", BODY, []),
        ("mounted", host, "/ml/v2/models/tiny/infer", BODY, []),
        ("binary", v2app, "/v2/models/tiny/infer", BINARY_BODY, binary),
    ]
    async with v2app.lifespan():
        best: dict[str, float] = {}
        for _ in range(reps):
            for name, app, path, body, extra in cases:
                figure = await _run(app, path, body, n, extra)
                best[name] = min(best.get(name, figure), figure)
    print(f"| case | CPU µs per request (min of {reps} runs of {n}) |")
    print("| --- | ---: |")
    for name, figure in best.items():
        print(f"| {name} | {figure:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asgi_overhead")
    parser.add_argument("-n", type=int, default=5000, help="requests per repetition")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(args.n, args.reps))
