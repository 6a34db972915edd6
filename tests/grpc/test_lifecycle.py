"""The gRPC server starts and stops with the app: its lifespan, ``V2Middleware``'s, the
standalone server's; on asyncio and trio hosts; with TLS; failing loudly when it cannot."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import numpy as np
import pytest
import trustme
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.grpc.conftest import Clients, call, raw_request, rpc_error, serving
from tests.support import free_port
from v2mount import V2App, V2Middleware
from v2mount.demo.models import Identity
from v2mount.errors import SettingsError
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from v2mount.model import Model
from v2mount.settings import ModelSettings
from v2mount.standalone import create_app
from v2mount.testing import run_lifespan
from v2mount.types import InferenceRequest

pytestmark = pytest.mark.anyio


def identity(name: str = "identity") -> Identity:
    return Identity(ModelSettings(name=name, parallel_workers=0))


def live(target: str, **kwargs: Any) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=30, **kwargs).live)


def answers(target: str) -> bool:
    try:
        return live(target)
    except grpc.RpcError:
        return False


def grpc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "v2mount-grpc"]


async def test_the_app_lifespan_starts_and_stops_grpc(anyio_backend: str) -> None:
    app = V2App([identity()], grpc_port=0)
    assert app.grpc is not None and app.grpc.port is None
    async with app.lifespan():
        target = f"127.0.0.1:{app.grpc.port}"
        assert await call(live, target)
        # Under trio, grpc.aio runs on an asyncio loop in its own thread.
        assert grpc_threads() == ([] if anyio_backend == "asyncio" else ["v2mount-grpc"])
    assert app.grpc.port is None
    assert grpc_threads() == []
    error = await call(rpc_error, live, target)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_v2middleware_lifespan_starts_and_stops_grpc() -> None:
    app = V2App([identity()], grpc_port=0)
    host = Starlette()
    host.add_middleware(V2Middleware, v2app=app)
    async with run_lifespan(host):
        assert app.grpc is not None and app.grpc.port is not None
        assert await call(live, f"127.0.0.1:{app.grpc.port}")
    assert app.grpc.port is None


async def test_a_mount_without_lifespan_starts_grpc_with_the_first_request() -> None:
    app = V2App([identity()], grpc_port=0)
    host = Starlette(routes=[Mount("/ml", app=app)])
    assert app.grpc is not None
    try:
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert app.grpc.port is None
            assert (await client.get("/ml/v2/health/ready")).status_code == 200
        assert app.grpc.port is not None
        assert await call(live, f"127.0.0.1:{app.grpc.port}")
    finally:
        await app.shutdown()
    assert app.grpc.port is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # its worker pools make it slow
async def test_the_standalone_app_serves_grpc_under_a_route_prefix() -> None:
    server: Any = create_app(route_prefix="/ml", model_parallel_workers=0, grpc_port=0)
    app = server.routes[0].app
    assert isinstance(app, V2App)
    async with run_lifespan(server):
        assert app.grpc is not None
        clients = Clients(app)
        try:
            assert await call(clients.triton.is_model_ready, "linear", "2")
        finally:
            clients.close()


async def test_two_apps_serve_their_own_models_side_by_side() -> None:
    one, two = V2App([identity("one")], grpc_port=0), V2App([identity("two")], grpc_port=0)
    async with serving(one) as first, serving(two) as second:
        assert await call(first.triton.is_model_ready, "one")
        assert not await call(first.triton.is_model_ready, "two")
        assert await call(second.triton.is_model_ready, "two")


async def test_a_port_in_use_fails_startup_before_any_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = V2App([identity()], grpc_port=port)
        with pytest.raises(SettingsError, match=f"gRPC cannot listen on 127.0.0.1:{port}"):
            await app.startup()
    assert app.registry.get("identity").state.value == "UNAVAILABLE"


async def test_processes_may_share_the_port_when_told() -> None:
    """``grpc_reuse_port``: what ``uvicorn --workers`` needs (shown with two apps)."""
    first = V2App([identity("one")], grpc_port=0, grpc_reuse_port=True)
    async with serving(first) as clients:
        assert first.grpc is not None
        second = V2App([identity("two")], grpc_port=first.grpc.port, grpc_reuse_port=True)
        async with second.lifespan():
            assert second.grpc is not None and second.grpc.port == first.grpc.port
            # The kernel hands each new connection to one of them: either answers.
            ready = [await call(clients.triton.is_model_ready, name) for name in ("one", "two")]
            assert ready in ([True, False], [False, True])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grpc_ssl_certfile": "cert.pem"}, "needs both"),
        ({"grpc_ssl_ca_certs": "ca.pem"}, "needs grpc_ssl_certfile"),
        ({"grpc_ssl_certfile": "absent.pem", "grpc_ssl_keyfile": "absent.pem"}, "cannot read"),
    ],
)
async def test_tls_settings_are_checked(settings: dict[str, str], message: str) -> None:
    app = V2App([identity()], grpc_port=0, **settings)
    with pytest.raises(SettingsError, match=message):
        await app.startup()


async def test_grpc_over_tls(tmp_path: Path) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_pem.write_to_path(str(keyfile))
    certificate.cert_chain_pems[0].write_to_path(str(certfile))
    app = V2App([identity()], grpc_port=0, grpc_ssl_certfile=certfile, grpc_ssl_keyfile=keyfile)

    def ask(port: int) -> bool:
        credentials = grpc.ssl_channel_credentials(authority.cert_pem.bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready)

    async with app.lifespan():
        assert app.grpc is not None and app.grpc.port is not None
        assert await call(ask, app.grpc.port)
        plain = await call(rpc_error, live, f"localhost:{app.grpc.port}")
        assert plain.code() == grpc.StatusCode.UNAVAILABLE


class Gate(Model):
    async def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.entered.set()
        await self.release.wait()
        return {"x": payload["x"]}


async def test_shutdown_lets_an_in_flight_call_finish() -> None:
    model = Gate(ModelSettings(name="gate", parallel_workers=0))
    model.entered, model.release = anyio.Event(), anyio.Event()
    app = V2App([model], grpc_port=0, grpc_shutdown_grace=60)
    lifespan = app.lifespan()
    await lifespan.__aenter__()
    clients = Clients(app)
    try:
        future = clients.stub.ModelInfer.future(raw_request("gate", x=np.ones(1, np.float32)))
        with anyio.fail_after(60):
            await model.entered.wait()
        target = clients.target
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan.__aexit__, None, None, None)
            with anyio.fail_after(60):  # stopping: new calls are refused, ours runs on
                while await call(answers, target):  # noqa: ASYNC110 - no event to wait on
                    await anyio.sleep(0.01)
            model.release.set()
        response = await call(future.result)
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [1.0]
    finally:
        clients.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python -m v2mount", "uvicorn v2mount:app"])
def test_the_standalone_server_serves_grpc_beside_rest_and_stops_on_sigterm(
    how: str, tmp_path: Path
) -> None:
    """The real server (uvicorn, uvloop when installed): --grpc-port or V2MOUNT_GRPC_PORT."""
    port, grpc_port = free_port(), free_port()
    log = (tmp_path / "server.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2MOUNT_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    if how == "python -m v2mount":
        command = [
            *(sys.executable, "-m", "v2mount", "--port", str(port)),
            *("--grpc-port", str(grpc_port), "--model-parallel-workers", "0"),
        ]
    else:
        command = [sys.executable, "-m", "uvicorn", "v2mount:app", "--port", str(port)]
        env |= {"V2MOUNT_GRPC_PORT": str(grpc_port), "V2MOUNT_MODEL_PARALLEL_WORKERS": "0"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while not stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready:
                assert time.monotonic() < deadline, "the models never became ready"
                time.sleep(0.1)
            response = stub.ModelInfer(raw_request("identity", x=np.arange(3.0, dtype=np.float32)))
            assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is complete.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    assert not answers(f"127.0.0.1:{grpc_port}")
