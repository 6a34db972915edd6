"""Security: no unpickling of network data, a repository API that stays in its folder,
size limits, no stack traces or file paths in answers, host auth on every route.
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import json
import marshal
import os
import pickle
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import dill
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route

import v2mount
from v2mount import V2App
from v2mount.demo.models import Identity
from v2mount.testing import V2Client, serve

pytestmark = pytest.mark.slow

PACKAGE = Path(v2mount.__file__).parent
EXAMPLES = PACKAGE.parent / "examples"
IDENTITY = "v2mount.demo.models.Identity"


# -- nothing from the network is unpickled --------------------------------------------


class _Trap:
    """Unpickling this calls ``os.mkdir(path)``: the proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.fixture(scope="module")
def echoes(reliability_models: ModuleType) -> Iterator[V2Client]:
    """The echo model twice: in a worker process and in the test process."""
    pooled = reliability_models.Faulty({"name": "pooled", "parallel_workers": 1})
    local = reliability_models.Faulty({"name": "local", "parallel_workers": 0})
    with serve([pooled, local]) as client:
        yield client


def binary_bytes_body(items: list[bytes]) -> tuple[bytes, dict[str, str]]:
    chunk = b"".join(struct.pack("<I", len(item)) + item for item in items)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [len(items)],
                    "parameters": {"binary_data_size": len(chunk)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return header + chunk, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("model", ["pooled", "local"])
def test_a_pickle_sent_as_bytes_is_only_bytes(
    echoes: V2Client, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trap = tmp_path / "unpickled"
    payloads = [pickle.dumps(_Trap(trap), protocol=p) for p in (0, 2, 5)]
    payloads.append(dill.dumps(_Trap(trap)))
    if model == "local":
        # On the in-process path nothing may even try.
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a request was unpickled")

        for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                             (dill, "loads"), (marshal, "loads")]:  # fmt: skip
            monkeypatch.setattr(module, name, refuse)
    body, headers = binary_bytes_body(payloads)
    answer = echoes.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    header_length = int(answer.headers["inference-header-content-length"])
    assert answer.content[header_length:] == body[int(headers["Inference-Header-Content-Length"]) :]
    # Protocol 0 is ASCII: it also fits in a JSON string.
    text = payloads[0].decode("ascii")
    document = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    answer = echoes.post(f"/v2/models/{model}/infer", json=document)
    assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [text]
    # A whole body that is a pickle is just a malformed request.
    for content_type in ("application/python-pickle", "application/octet-stream"):
        answer = echoes.post(
            f"/v2/models/{model}/infer", content=payloads[2], headers={"content-type": content_type}
        )
        assert answer.status_code == 400 and answer.json()["error"]
    assert not trap.exists()


#: Modules that may deserialise something other than JSON, and why that is not network data.
TRUSTED_DESERIALISERS = {
    # Frames between the web process and its own workers, built on the other side from
    # already-decoded tensors (BYTES elements travel as raw bytes, never pickled).
    "pool/_ipc.py": {"pickle"},
    # The stage calls' frames, the same way (their custom-metric updates).
    "pool/_stage_frames.py": {"pickle"},
    # The unloaded model the web process itself packed for its workers.
    "pool/_shipping.py": {"dill"},
    # Model artefacts read from the configured model repository, never from a request.
    "runtimes/sklearn.py": {"joblib", "pickle"},
}
DESERIALISERS = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "_pickle"}


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # importlib.import_module("pickle") and friends
            if node.value in DESERIALISERS:
                found.add(node.value)
    return found


def test_only_known_modules_can_deserialise_anything_but_json() -> None:
    seen: dict[str, set[str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        relative = file.relative_to(PACKAGE).as_posix()
        tree = ast.parse(file.read_text(encoding="utf-8"))
        used = _imports(tree) & DESERIALISERS
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("eval", "exec", "__import__")
        }
        assert not calls, f"{relative} calls {calls}"
        if used:
            seen[relative] = used
    assert seen.keys() <= TRUSTED_DESERIALISERS.keys(), seen
    for relative, used in seen.items():
        assert used <= TRUSTED_DESERIALISERS[relative], (relative, used)
    # The request path (HTTP → codecs → registry → batcher → pool caller) decodes with
    # JSON only, and hands the pool decoded tensors, never request bytes to unpickle.
    for folder in ("rest", "codecs", "batching"):
        assert not any(name.startswith(f"{folder}/") for name in seen), seen


def test_pool_frames_carry_request_bytes_as_data(tmp_path: Path) -> None:
    """The worker-side decode of a request holding a pickle runs none of it."""
    from v2mount.codecs.request import decode_request
    from v2mount.pool._ipc import decode_request as from_frame
    from v2mount.pool._ipc import encode_request

    trap = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(trap))
    body, headers = binary_bytes_body([payload])
    request = decode_request(body, int(headers["Inference-Header-Content-Length"]))
    frame = encode_request(request, 1, None, 0)
    _, decoded = from_frame(bytearray(frame), None)
    assert decoded["x"].tolist() == [payload]
    assert not trap.exists()


# -- model exceptions -----------------------------------------------------------------


@pytest.mark.parametrize("model", ["pooled", "local"])
def test_a_model_exception_shows_its_message_and_nothing_else(echoes: V2Client, model: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    answer = echoes.post(
        f"/v2/models/{model}/infer", json={**body, "parameters": {"action": "raise"}}
    )
    assert answer.status_code == 500
    assert answer.json() == {"error": "ValueError: refused: the input is unusable"}
    for leak in ("Traceback", 'File "', ".py", "reliability_models", str(PACKAGE)):
        assert leak not in answer.text


@pytest.mark.parametrize("model", ["pooled", "local"])
def test_a_model_exception_does_not_leak_file_paths(echoes: V2Client, model: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    answer = echoes.post(
        f"/v2/models/{model}/infer", json={**body, "parameters": {"action": "path"}}
    )
    assert answer.status_code == 500
    assert answer.json()["error"].startswith("FileNotFoundError")
    assert "/srv/secret" not in answer.text


# -- the repository API stays in its folder -----------------------------------------------


@pytest.fixture(scope="module")
def repository_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[V2App, Path]:
    root = tmp_path_factory.mktemp("repo-root")
    repository = root / "repository"
    for folder, name in ((repository / "good", "good"), (root / "outside" / "evil", "evil")):
        folder.mkdir(parents=True)
        settings = {"name": name, "implementation": IDENTITY, "parallel_workers": 0}
        (folder / "model-settings.json").write_text(json.dumps(settings))
    (root / "evil").mkdir()
    (root / "evil" / "model-settings.json").write_text(
        json.dumps({"implementation": IDENTITY, "parallel_workers": 0})
    )
    return V2App(repository=repository), root


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


async def _asgi(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request with ``path`` exactly as given (no client normalises its dots)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "", "query_string": b"", "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


TRAVERSALS = [
    "..", ".", "../evil", "../outside/evil", "..\\outside\\evil", "/etc/passwd", "//etc/passwd",
    "%2e%2e", "..%2Foutside%2Fevil", "evil", "good/../../evil", "good\x00", "\x00", "~",
    "good/..", "./good", "....//evil",
]  # fmt: skip


@pytest.mark.anyio
async def test_repository_api_loads_only_from_its_folder(
    repository_app: tuple[V2App, Path],
) -> None:
    app, root = repository_app
    files = _files(root)
    async with app.lifespan():
        tried = 0
        for name in TRAVERSALS:
            for action in ("load", "unload"):
                status, body = await _asgi(app, "POST", f"/v2/repository/models/{name}/{action}")
                tried += 1
                assert 400 <= status < 500, (name, action, status, body)
                assert orjson.loads(body)["error"], (name, body)
        status, body = await _asgi(app, "POST", "/v2/repository/index", b"{}")
        assert status == 200
        assert [entry["name"] for entry in orjson.loads(body)] == ["good"]
        assert (await _asgi(app, "GET", "/v2/models/evil/ready"))[0] == 404
        # Triton's load may upload files ("file:<path>"): v2mount writes none.
        upload = {
            "parameters": {
                "config": json.dumps({"name": "evil", "implementation": IDENTITY}),
                "file:1/model-settings.json": base64.b64encode(b"{}").decode(),
                "file:../../outside/planted.py": base64.b64encode(b"import os").decode(),
            }
        }
        status, body = await _asgi(
            app, "POST", "/v2/repository/models/good/load", orjson.dumps(upload)
        )
        assert status == 200, body
    assert _files(root) == files
    assert tried == 2 * len(TRAVERSALS)


ENCODED = [
    "%2E%2E", "..%2Fevil", "%2E%2E%2Foutside%2Fevil", "%2Fetc%2Fpasswd", "..%5Coutside%5Cevil",
    "%00", "good%2F..%2F..%2Fevil", "%252e%252e",
]  # fmt: skip


def test_repository_api_percent_encoded_names(repository_app: tuple[V2App, Path]) -> None:
    app, _ = repository_app
    with serve(app) as client:
        for raw in ENCODED:
            answer = client.post(f"/v2/repository/models/{raw}/load")
            assert 400 <= answer.status_code < 500 and answer.json()["error"], raw
        assert [e["name"] for e in client.repository_index()] == ["good"]


def test_repository_api_can_be_disabled(tmp_path: Path) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    (folder / "model-settings.json").write_text(
        json.dumps({"implementation": IDENTITY, "parallel_workers": 0})
    )
    app = V2App(repository=tmp_path, repository_api_enabled=False)
    with serve(app) as client:
        for path in ("/v2/repository/index", "/v2/repository/models/good/load",
                     "/v2/repository/models/good/unload"):  # fmt: skip
            answer = client.post(path)
            assert answer.status_code == 403
            assert answer.json() == {"error": "the model repository extension is disabled"}
        assert "model_repository" not in client.metadata()["extensions"]
        assert client.ready("good")


# -- size limits --------------------------------------------------------------------


def test_request_size_limit(tmp_path: Path) -> None:
    app = V2App(
        [Identity({"name": "echo"})],
        max_request_bytes=4096,
        model_parallel_workers=0,
    )
    small = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    big = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2000], "data": [1.5] * 2000}]}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    with serve(app) as client:
        assert client.post("/v2/models/echo/infer", json=small).status_code == 200
        answer = client.post("/v2/models/echo/infer", content=big)
        assert answer.status_code == 413
        assert answer.json() == {
            "error": f"request body of {len(big)} bytes exceeds the 4096-byte limit"
        }
        # No Content-Length: the limit holds while the body streams in.
        answer = client.post("/v2/models/echo/infer", content=chunks())
        assert answer.status_code == 413
        assert answer.json() == {"error": "request body exceeds the 4096-byte limit"}
        # A Content-Length that lies low does not lift the limit.
        answer = client.post(
            "/v2/models/echo/infer", content=chunks(), headers={"content-length": "10"}
        )
        assert 400 <= answer.status_code < 500
        # The repository routes take small JSON bodies only.
        answer = client.post("/v2/repository/index", content=b" " * 70_000)
        assert answer.status_code == 413 and answer.json()["error"]
        assert client.ready()


# -- host auth covers every route ------------------------------------------------------


@pytest.fixture(scope="module")
def starlette_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "v2mount_reliability_starlette_example", EXAMPLES / "starlette_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def versioned_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("auth-repository")
    folder = root / "good" / "1"
    folder.mkdir(parents=True)
    (folder / "model-settings.json").write_text(
        json.dumps({"implementation": IDENTITY, "parallel_workers": 0})
    )
    return root


def concrete(route: Route) -> str:
    values = {"name": "good", "version": "1", "file": "swagger-ui.css"}
    path = route.path
    for key in route.param_convertors:
        path = path.replace(f"{{{key}}}", values[key])
    assert "{" not in path, route.path
    return path


INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}


def check_every_route(client: V2Client, routes: list[Route]) -> int:
    """Each method of each route: 401 without the token, v2mount's 200 with it."""
    token = {"authorization": "Bearer s3cret"}
    checked = 0
    for route in routes:
        path = concrete(route)
        for method in sorted(route.methods or ()):
            body = INFER if path.endswith("/infer") else None
            denied = client.request(method, path, json=body)
            assert denied.status_code == 401, (method, path, denied.status_code)
            allowed = client.request(method, path, json=body, headers=token)
            # The route is real: with the token v2mount itself answers it.
            assert allowed.status_code == 200, (method, path, allowed.status_code, allowed.text)
            checked += 1
    return checked


def test_host_auth_covers_every_v2mount_route_behind_the_middleware(
    starlette_example: ModuleType, versioned_repository: Path
) -> None:
    host = starlette_example.create_app(
        "s3cret", open_health=False, repository=versioned_repository
    )
    routes = [r for r in V2App(repository=versioned_repository).routes() if isinstance(r, Route)]
    with serve(host, wait_ready=False) as client:
        # Unload last: it takes the model away from the routes after it.
        routes.sort(key=lambda r: r.path.endswith("/unload"))
        assert check_every_route(client, routes) == sum(len(r.methods or ()) for r in routes)


def test_host_auth_covers_every_v2mount_route_under_a_mount(
    starlette_example: ModuleType, versioned_repository: Path
) -> None:
    v2app = V2App(repository=versioned_repository)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with v2app.lifespan():
            yield

    host = Starlette(
        routes=[Mount("/ml", app=v2app)],
        middleware=[Middleware(starlette_example.BearerAuth, token="s3cret")],
        lifespan=lifespan,
    )
    routes = [r for r in v2app.routes() if isinstance(r, Route)]
    routes.sort(key=lambda r: r.path.endswith("/unload"))
    with serve(host, prefix="/ml", wait_ready=False) as client:
        assert check_every_route(client, routes) == sum(len(r.methods or ()) for r in routes)
