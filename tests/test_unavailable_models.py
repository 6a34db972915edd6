"""Models that cannot serve: broken settings beside good models, and reasons that keep
every absolute path to themselves (in-process and in worker pools alike)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from v2mount import V2App
from v2mount.errors import SettingsError
from v2mount.standalone import create_app

pytestmark = pytest.mark.anyio

Serve = Callable[[V2App], AbstractAsyncContextManager[httpx.AsyncClient]]
IDENTITY = "v2mount.demo.models.Identity"
LINEAR = "v2mount.demo.models.LinearClassifier"
ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}

LEAKY = """
from v2mount import Model


class Leaky(Model):
    def predict(self, payload):
        raise FileNotFoundError(2, "No such file or directory", "{secret}/lookup.csv")
"""


def write(folder: Path, document: dict[str, Any] | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else json.dumps(document)
    (folder / "model-settings.json").write_text(text)


def broken_repository(root: Path) -> Path:
    write(root / "good", {"implementation": IDENTITY, "parallel_workers": 0})
    write(root / "bad-json", '{"implementation": "v2mount.demo.models.Identity",}')
    write(root / "no-such-class", {"implementation": "v2mount.demo.models.Nope"})
    write(root / "bad-value", {"implementation": IDENTITY, "parallel_workers": "many"})
    return root


async def test_broken_settings_leave_their_model_unavailable_and_the_others_serving(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount")
    app = V2App(repository=broken_repository(tmp_path / "models"))
    # One start reports every problem, one line each, naming model and file.
    errors = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert len(errors) == 3
    assert errors[0].startswith("model 'bad-json': bad-json/model-settings.json: not valid JSON")
    assert errors[1].startswith(
        "model 'bad-value': bad-value/model-settings.json: parallel_workers: Input should be"
    )
    assert errors[2].startswith(
        "model 'no-such-class': no-such-class/model-settings.json: cannot import "
        "implementation 'v2mount.demo.models.Nope'"
    )
    async with serve(app) as client:
        ok = await client.post("/v2/models/good/infer", json=ROW)
        assert ok.status_code == 200
        ready = (await client.get("/v2/models/bad-json/ready")).json()
        assert ready["ready"] is False and ready["error"].startswith(
            "model bad-json is not ready (UNAVAILABLE): model 'bad-json': "
            "bad-json/model-settings.json: not valid JSON"
        )
        answer = await client.post("/v2/models/no-such-class/infer", json=ROW)
        assert answer.status_code == 503 and "cannot import implementation" in answer.text
        index = (await client.post("/v2/repository/index", json={})).json()
        states = {entry["name"]: (entry["state"], entry["reason"]) for entry in index}
        assert states["good"] == ("READY", "")
        assert states["bad-value"][0] == "UNAVAILABLE"
        assert "bad-value/model-settings.json: parallel_workers" in states["bad-value"][1]
        # Fixed on disk, the model loads through the repository API.
        write(tmp_path / "models" / "bad-json", {"implementation": IDENTITY})
        loaded = await client.post("/v2/repository/models/bad-json/load", json={})
        assert loaded.status_code == 200, loaded.text
        assert (await client.post("/v2/models/bad-json/infer", json=ROW)).status_code == 200
        again = await client.post("/v2/repository/models/bad-value/load", json={})
        assert again.status_code == 400 and "parallel_workers" in again.json()["error"]


def test_a_standalone_server_with_nothing_to_serve_fails_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write(root / "bad-json", "{")
    write(root / "no-such-class", {"implementation": "nowhere.Model"})
    with pytest.raises(SettingsError, match=r"nothing to serve: .* \(2 broken, each reason"):
        create_app(model_repository=root)
    env = {**os.environ, "V2MOUNT_MODEL_REPOSITORY": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", "import v2mount; v2mount.app"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("v2mount: nothing to serve: no model in ")
    # Above it, the reasons: one logged line per broken model, with time, level, logger.
    assert len(lines) == 3
    assert all(" ERROR:" in line and "v2mount.repository: model '" in line for line in lines[:2])


async def test_no_absolute_path_reaches_a_client(tmp_path: Path, serve: Serve) -> None:
    secret = tmp_path / "srv-secret"
    root = tmp_path / "models"
    root.mkdir()
    (root / "leaky_model.py").write_text(LEAKY.format(secret=secret))
    missing = str(secret / "weights.npz")
    write(root / "good", {"implementation": IDENTITY, "parallel_workers": 0})
    write(root / "leaky", {"implementation": "leaky_model.Leaky", "parallel_workers": 0})
    write(
        root / "inproc",
        {"implementation": LINEAR, "parallel_workers": 0, "parameters": {"uri": missing}},
    )
    write(
        root / "pooled",
        {"implementation": LINEAR, "parallel_workers": 1, "parameters": {"uri": missing}},
    )
    write(root / "broken", "{not json")
    names = ["good", "leaky", "inproc", "pooled", "broken", "absent"]
    bodies: list[str] = []
    async with serve(V2App(repository=root)) as client:
        calls = [
            client.get("/v2/health/ready"),
            client.post("/v2/repository/index", json={}),
            client.get("/v2/models/stats"),
        ]
        for name in names:
            calls += [
                client.get(f"/v2/models/{name}/ready"),
                client.get(f"/v2/models/{name}"),
                client.post(f"/v2/models/{name}/infer", json=ROW),
            ]
        for call in calls:
            bodies.append((await call).text)
        for name in names:
            answer = await client.post(f"/v2/repository/models/{name}/load", json={})
            bodies.append(answer.text)
    text = "\n".join(bodies)
    assert str(tmp_path) not in text and "srv-secret" not in text
    # The reasons are still there, cut to what a client may know.
    assert "FileNotFoundError: No such file or directory: '.../lookup.csv'" in text
    assert "failed to load model pooled: " in text  # the repository API's answer
    assert text.count(".../weights.npz") >= 4  # ready, infer and load of both failed models
