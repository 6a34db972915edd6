"""Repository and statistics extensions through the ASGI app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from v2mount import V2App

pytestmark = pytest.mark.anyio

MODELS = """
import anyio
from v2mount import Model


class Scale(Model):
    def predict(self, payload):
        factor = self.settings.parameters.model_extra.get("factor", 1)
        return {"y": payload["x"] * factor}


class Slow(Model):
    async def predict(self, payload):
        await anyio.sleep(0.3)
        return {"y": payload["x"]}
"""


def write_model(root: Path, name: str, implementation: str, **extra: Any) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    document = {"name": name, "implementation": implementation, "parallel_workers": 0, **extra}
    (folder / "model-settings.json").write_text(json.dumps(document))


@pytest.fixture
def repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = f"ext_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{package}.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_model(tmp_path, "scale", f"{package}.Scale", parameters={"factor": 2})
    write_model(tmp_path, "slow", f"{package}.Slow")
    return tmp_path


BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [3]}]}


async def test_index_load_unload_reload(serve: Any, repository: Path) -> None:
    async with serve(V2App(repository=repository)) as client:
        r = await client.post("/v2/repository/index")  # empty body, as tritonclient sends
        assert r.status_code == 200
        assert r.json() == [
            {"name": "scale", "state": "READY", "reason": ""},
            {"name": "slow", "state": "READY", "reason": ""},
        ]
        r = await client.post(
            "/v2/repository/models/scale/unload", json={"parameters": {"unload_dependents": False}}
        )
        assert (r.status_code, r.json()) == (200, {})
        assert (await client.get("/v2/models/scale/ready")).status_code == 400
        r = await client.post("/v2/models/scale/infer", json=BODY)
        assert r.status_code == 503 and "unloaded" in r.json()["error"]
        r = await client.post("/v2/repository/index", json={"ready": True})
        assert [e["name"] for e in r.json()] == ["slow"]
        # Reload picks up a changed model-settings.json.
        settings_file = repository / "scale" / "model-settings.json"
        document = json.loads(settings_file.read_text())
        document["parameters"] = {"factor": 5}
        settings_file.write_text(json.dumps(document))
        r = await client.post("/v2/repository/models/scale/load", json={})
        assert (r.status_code, r.json()) == (200, {})
        r = await client.post("/v2/models/scale/infer", json=BODY)
        assert r.json()["outputs"][0]["data"] == [15.0]


async def test_load_errors(serve: Any, repository: Path) -> None:
    async with serve(V2App(repository=repository)) as client:
        r = await client.post("/v2/repository/models/missing/load")
        assert r.status_code == 404 and "not in the model repository" in r.json()["error"]
        for name in ("..", "%2E%2E", "a%2Fb", "a%5Cb"):
            r = await client.post(f"/v2/repository/models/{name}/load")
            assert r.status_code in (400, 404), name
            assert r.json()["error"]
        r = await client.post("/v2/repository/models/scale/load", content=b"[1]")
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
        write_model(repository, "broken", "no_such_module.Thing")
        r = await client.post("/v2/repository/models/broken/load")
        assert r.status_code == 400 and "cannot import implementation" in r.json()["error"]
        r = await client.post("/v2/repository/models/missing/unload")
        assert r.status_code == 404


async def test_unload_drains_in_flight_requests(serve: Any, repository: Path) -> None:
    results: dict[str, int] = {}
    async with serve(V2App(repository=repository)) as client:

        async def infer() -> None:
            r = await client.post("/v2/models/slow/infer", json=BODY)
            results["infer"] = r.status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(infer)
            await anyio.sleep(0.1)
            r = await client.post("/v2/repository/models/slow/unload")
            results["unload"] = r.status_code
            assert "infer" in results  # unload returned only after the request finished
        assert results == {"infer": 200, "unload": 200}


async def test_repository_api_can_be_disabled(serve: Any, repository: Path) -> None:
    app = V2App(repository=repository, repository_api_enabled=False)
    async with serve(app) as client:
        r = await client.post("/v2/repository/index")
        assert r.status_code == 403 and "disabled" in r.json()["error"]
        r = await client.post("/v2/repository/models/scale/unload")
        assert r.status_code == 403
        assert "model_repository" not in (await client.get("/v2")).json()["extensions"]


async def test_statistics(serve: Any, repository: Path) -> None:
    async with serve(V2App(repository=repository)) as client:
        await client.post("/v2/models/scale/infer", json=BODY)
        r = await client.post("/v2/models/scale/infer", json={"inputs": []})
        assert r.status_code == 400  # rejected before it reaches the model: not counted
        two_rows = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
        await client.post("/v2/models/scale/infer", json=two_rows)
        r = await client.get("/v2/models/scale/stats")
        (entry,) = r.json()["model_stats"]
        assert entry["name"] == "scale" and entry["inference_count"] == 3
        assert entry["inference_stats"]["success"]["count"] == 2
        assert entry["inference_stats"]["compute_infer"]["count"] == 2
        r = await client.get("/v2/models/stats")
        assert {e["name"] for e in r.json()["model_stats"]} == {"scale", "slow"}
        r = await client.get("/v2/models/missing/stats")
        assert r.status_code == 404
