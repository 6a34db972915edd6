"""What the server log tells an operator: loads, unloads, tracebacks, client errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from v2mount import InferenceRequest, Model, V2App
from v2mount.logs import logging_config

pytestmark = pytest.mark.anyio

Serve = Callable[[V2App], AbstractAsyncContextManager[httpx.AsyncClient]]
ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


class Doubler(Model):
    name = "doubler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, payload: InferenceRequest) -> Any:
        if payload.parameters.get("fail"):
            raise RuntimeError("asked to fail")
        return {"y": payload["x"] * 2}


class BadLoad(Model):
    name = "bad-load"

    def load(self) -> None:
        raise ValueError("weights missing")


def _this_file_in(exc_info: Any) -> bool:
    text = "".join(traceback.format_exception(*exc_info))
    return __file__ in text


async def test_one_line_per_model_loaded_and_unloaded(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    app = V2App([Doubler(parameters={"version": "3"})], model_parallel_workers=0)
    async with serve(app):
        pass
    lines = [(r.name, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2
    assert lines[0][0] == "v2mount.registry"
    assert lines[0][1].startswith("model doubler:3 loaded: in-process, in ")
    assert lines[0][1].endswith(" s")
    assert lines[1] == ("v2mount.registry", "model doubler:3 unloaded")


async def test_a_pool_load_line_counts_its_workers(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount.registry")
    async with serve(V2App([Doubler(parallel_workers=1)])):
        pass
    loaded = [r.getMessage() for r in caplog.records if " loaded: " in r.getMessage()]
    assert len(loaded) == 1 and loaded[0].startswith("model doubler loaded: 1 worker process, in")


async def test_a_failing_load_logs_its_traceback_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    async with serve(V2App([BadLoad(), Doubler()], model_parallel_workers=0)) as client:
        ready = (await client.get("/v2/models/bad-load/ready")).json()
    assert ready["error"].endswith("ValueError: weights missing")
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1
    (record,) = with_traceback
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "model bad-load failed to load: ValueError: weights missing"
    assert _this_file_in(record.exc_info)  # the model's own file and line


async def test_a_failing_predict_logs_its_traceback_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    async with serve(V2App([Doubler()], model_parallel_workers=0)) as client:
        body = {**ROW, "id": "req-9", "parameters": {"fail": True}}
        answer = await client.post("/v2/models/doubler/infer", json=body)
    assert answer.status_code == 500
    assert answer.json() == {"error": "RuntimeError: asked to fail"}
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1
    assert with_traceback[0].getMessage() == "model 'doubler': predict raised (request id req-9)"
    assert _this_file_in(with_traceback[0].exc_info)


async def test_a_failing_batch_logs_one_traceback_for_all_its_requests(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    model = Doubler(max_batch_size=3, max_batch_time=60)
    statuses: list[int] = []
    async with serve(V2App([model], model_parallel_workers=0)) as client:

        async def send() -> None:
            body = {**ROW, "parameters": {"fail": True}}
            statuses.append((await client.post("/v2/models/doubler/infer", json=body)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(3):  # the third fills the batch: it runs at once
                tg.start_soon(send)
    assert statuses == [500, 500, 500]
    assert len([r for r in caplog.records if r.exc_info]) == 1


@pytest.mark.parametrize("at_info", [False, True])
async def test_a_client_error_is_logged_with_its_reason_and_request_id(
    serve: Serve, caplog: pytest.LogCaptureFixture, at_info: bool
) -> None:
    caplog.set_level(logging.DEBUG, logger="v2mount")
    app = V2App([Doubler()], model_parallel_workers=0, log_client_errors=at_info)
    async with serve(app) as client:
        body = {"id": "req-7", "inputs": [{**ROW["inputs"][0], "name": "z"}]}
        answer = await client.post("/v2/models/doubler/infer", json=body)
        assert answer.status_code == 400
        assert (await client.get("/v2/models/nope")).status_code == 404
    answers = [r for r in caplog.records if r.name == "v2mount.rest"]
    assert [r.levelno for r in answers] == [logging.INFO if at_info else logging.DEBUG] * 2
    assert answers[0].getMessage() == (
        "POST /v2/models/doubler/infer answered 400 (request id req-7): unexpected inference "
        "input 'z' for model 'doubler'; expected ['x']"
    )
    assert answers[1].getMessage() == (
        "GET /v2/models/nope answered 404 (request id -): model 'nope' not found"
    )


def test_a_mounted_app_configures_no_logging() -> None:
    package = logging.getLogger("v2mount")
    before = (package.handlers[:], package.level, package.propagate)
    V2App([Doubler()], model_parallel_workers=0)
    assert (package.handlers, package.level, package.propagate) == before
    assert package.handlers == []


def test_python_m_v2mount_logs_uvicorn_and_v2mount_in_one_format() -> None:
    config = logging_config("info")
    formats = {name: f["fmt"] for name, f in config["formatters"].items()}
    assert formats["default"] == "%(asctime)s %(levelprefix)s %(name)s: %(message)s"
    assert formats["access"].startswith("%(asctime)s %(levelprefix)s %(name)s: %(client_addr)s")
    assert set(config["loggers"]) >= {"v2mount", "uvicorn", "uvicorn.error", "uvicorn.access"}


def test_uvicorn_v2mount_app_logs_each_load_at_info(tmp_path: Path) -> None:
    folder = tmp_path / "echo"
    folder.mkdir()
    document = {"implementation": "v2mount.demo.models.Identity", "parallel_workers": 0}
    (folder / "model-settings.json").write_text(json.dumps(document))
    env = {**os.environ, "V2MOUNT_MODEL_REPOSITORY": str(tmp_path)}
    command = [sys.executable, "-m", "uvicorn", "v2mount:app", "--port", "0"]
    lines: list[str] = []
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as server:
        assert server.stderr is not None
        try:
            for line in server.stderr:
                lines.append(line)
                if "Application startup complete" in line or "Traceback" in line:
                    break
        finally:
            server.terminate()
            server.communicate(timeout=60)
    loaded = [line for line in lines if " loaded: " in line]
    assert len(loaded) == 1, lines
    # Time, level, logger name, then the message.
    date, clock, level, logger, *message = loaded[0].split()
    assert date.count("-") == 2 and clock.count(":") == 2
    assert (level, logger) == ("INFO:", "v2mount.registry:")
    assert " ".join(message).startswith("model echo loaded: in-process, in ")


class BadPoolLoad(Model):
    name = "bad-pool"

    def load(self) -> None:
        with open("/srv/secret-place/weights.bin"):
            pass


@pytest.mark.slow
async def test_a_pool_of_4_failing_to_load_logs_one_traceback_and_one_summary(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    async with serve(V2App([BadPoolLoad(parallel_workers=4), Doubler()])) as client:
        ready = (await client.get("/v2/models/bad-pool/ready")).json()
    assert "secret-place" not in ready["error"]
    assert ready["error"].endswith(
        "FileNotFoundError: No such file or directory: '.../weights.bin'"
    )
    tracebacks = [r for r in caplog.records if "loading the model failed" in r.getMessage()]
    assert len(tracebacks) == 1 and __file__ in tracebacks[0].getMessage()
    failures = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert failures == [
        "model 'bad-pool' failed to load: FileNotFoundError: No such file or directory: "
        "'.../weights.bin'",
        "model bad-pool failed to load: FileNotFoundError: No such file or directory: "
        "'.../weights.bin'",
    ]
