"""The pytest fixtures: what they serve, with which settings, and that they clean up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.support import alive
from v2mount import InferenceRequest, Model, V2App
from v2mount.demo.models import Identity
from v2mount.testing import AsyncV2Client, ModelsNotReady, V2Client

AsyncFactory = Callable[..., Awaitable[AsyncV2Client]]
SyncFactory = Callable[..., V2Client]

ONE_ROW = {"x": np.ones((1, 2), np.float32)}

PID_MODEL = """
import os
import subprocess
import sys

import numpy as np

from v2mount import Model


class Pid(Model):
    \"\"\"Answers the id of the process ``predict`` ran in; records the rows of each call.\"\"\"

    name = "pid"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def predict(self, payload):
        rows = payload["x"].shape[0]
        self.calls.append(rows)
        return {"pid": np.full(rows, os.getpid(), np.int64), "x": payload["x"]}
"""
exec(PID_MODEL)  # the same class here and in the files the tests write
Pid: Any = globals()["Pid"]


class BrokenLoad(Model):
    name = "broken"

    def load(self) -> None:
        raise FileNotFoundError("weights.bin is missing")

    def predict(self, payload: InferenceRequest) -> Any:
        raise AssertionError("never loaded")


def served_pid(client: V2Client, model: str = "pid") -> int:
    return int(client.infer(model, ONE_ROW)["pid"][0])


def test_a_model_class_runs_in_process_by_default(v2_client: SyncFactory) -> None:
    client = v2_client(Pid, settings={"name": "renamed", "platform": "numpy"})
    assert served_pid(client, "renamed") == os.getpid()
    assert client.metadata("renamed")["platform"] == "numpy"


def test_a_model_instance_keeps_its_state_and_takes_overrides(v2_client: SyncFactory) -> None:
    model = Pid({"name": "mine"})
    client = v2_client(model, settings={"platform": "custom"}, max_batch_time=0.5)
    client.infer("mine", {"x": np.ones((3, 1))})
    assert model.calls == [3]
    assert model.settings.platform == "custom" and model.settings.max_batch_time == 0.5


def test_a_repository_takes_server_defaults_its_files_can_override(
    v2_client: SyncFactory, tmp_path: Path
) -> None:
    (tmp_path / "v2mount_test_pid_model.py").write_text(PID_MODEL)
    for name, settings in {"fixed": {"parallel_workers": 0}, "free": {}}.items():
        folder = tmp_path / name
        folder.mkdir()
        document = {"implementation": "v2mount_test_pid_model.Pid", **settings}
        (folder / "model-settings.json").write_text(json.dumps(document))
    (tmp_path / "settings.json").write_text(json.dumps({"server_name": "from-the-file"}))
    client = v2_client(tmp_path, server_settings={"model_max_queue_size": 3})
    assert served_pid(client, "fixed") == os.getpid() == served_pid(client, "free")
    assert client.metadata()["name"] == "from-the-file"
    stats = client.get("/v2/models/stats").json()["model_stats"]
    assert sorted(entry["name"] for entry in stats) == ["fixed", "free"]
    with pytest.raises(TypeError, match="for a repository use server_settings="):
        v2_client(tmp_path, settings={"name": "x"})


def test_apps_are_served_as_given_with_a_prefix(v2_client: SyncFactory) -> None:
    v2app = V2App([Identity()], model_parallel_workers=0)
    client = v2_client(Starlette(routes=[Mount("/ml", v2app)]), prefix="/ml")
    assert client.prefix == "/ml" and client.ready("identity")
    assert client.infer("identity", {"x": [1, 2]})["x"].tolist() == [1, 2]
    with pytest.raises(TypeError, match="not to an app that is already built"):
        v2_client(v2app, parallel_workers=1)
    with pytest.raises(TypeError, match="cannot serve 3"):
        v2_client(3)


def test_a_model_that_fails_to_load_stops_the_factory_with_its_reason(
    v2_client: SyncFactory,
) -> None:
    with pytest.raises(ModelsNotReady, match=r"broken UNAVAILABLE: .*weights\.bin is missing"):
        v2_client([Pid, BrokenLoad])
    client = v2_client([Pid, BrokenLoad], wait_ready=False)
    assert not client.ready() and not client.ready("broken") and client.ready("pid")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    answer = client.post("/v2/models/broken/infer", json=body)
    assert answer.status_code == 503 and "weights.bin is missing" in answer.json()["error"]


@pytest.mark.anyio
async def test_batching_settings_reach_the_model(v2_async_client: AsyncFactory) -> None:
    model = Pid()
    client = await v2_async_client(model, max_batch_size=4, max_batch_time=60)
    results: list[np.ndarray[Any, Any]] = []

    async def one(value: float) -> None:
        result = await client.infer("pid", {"x": np.full((1, 1), value)})
        results.append(result["x"])

    async with anyio.create_task_group() as tg:
        for value in range(4):
            tg.start_soon(one, float(value))
    assert model.calls == [4]  # the batch left when full, long before max_batch_time
    assert sorted(float(x[0, 0]) for x in results) == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.anyio
async def test_the_async_factory_may_be_called_inside_a_cancel_scope(
    v2_async_client: AsyncFactory,
) -> None:
    with anyio.fail_after(30):
        client = await v2_async_client(Identity)
        second = await v2_async_client(Pid)
    assert (await client.infer("identity", {"x": [1]}))["x"].tolist() == [1]
    assert (await second.infer("pid", ONE_ROW))["pid"].tolist() == [os.getpid()]


@pytest.mark.slow
def test_parallel_workers_serve_from_worker_processes(v2_client: SyncFactory) -> None:
    client = v2_client(Pid, parallel_workers=1, backend="trio")
    pid = served_pid(client)
    assert pid != os.getpid() and alive(pid)


FAILING_TEST = (
    PID_MODEL
    + """

def test_fails(v2_client):
    client = v2_client(Pid, parallel_workers=1)
    pid = int(client.infer("pid", {"x": np.ones((1, 1))})["pid"][0])
    with open(RECORD, "w") as file:
        file.write(str(pid))
    assert pid == os.getpid(), "fails on purpose"
"""
)


@pytest.mark.slow
def test_worker_processes_stop_when_the_test_fails(tmp_path: Path) -> None:
    record = tmp_path / "pid.txt"
    test_file = tmp_path / "test_fails_on_purpose.py"
    test_file.write_text(FAILING_TEST.replace("RECORD", repr(str(record))))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    code = pytest.main([str(tmp_path), "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)])
    assert code == pytest.ExitCode.TESTS_FAILED
    pid = int(record.read_text())
    assert pid != os.getpid() and not alive(pid)


def test_the_plugin_loads_without_httpx_or_the_clients() -> None:
    """pytest loads the plugin in every project installed beside v2mount."""
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "import v2mount.testing.plugin\n"
        "assert 'v2mount.testing.client' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
