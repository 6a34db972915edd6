"""``examples/starlette_app.py``: host bearer auth in front of ``V2Middleware``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from v2mount.testing import V2Client, V2HTTPError

SyncFactory = Callable[..., V2Client]
READINGS = {"readings": [[61.5, 2.8, 4.1]]}
BODY = {"inputs": [{"name": "readings", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


@pytest.fixture(scope="module")
def example(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("starlette_app")


@pytest.fixture(scope="module")
def repository(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repository with the in-process model only (no worker to start)."""
    folder = tmp_path_factory.mktemp("anomaly-only")
    shutil.copytree(models / "anomaly", folder / "anomaly")
    return folder


def test_oip_routes_need_the_token_and_health_stays_open(
    v2_client: SyncFactory, repository: Path, example: ModuleType
) -> None:
    client = v2_client(example.create_app("s3cret", repository=repository))
    assert client.live() and client.ready() and client.get("/").text == "orders service"
    for method, path in [("GET", "/v2"), ("GET", "/v2/models/anomaly"), ("GET", "/metrics")]:
        denied = client.request(method, path)
        assert denied.status_code == 401 and denied.json() == {"error": "unauthorized"}, path
        assert denied.headers["www-authenticate"] == "Bearer"
    with pytest.raises(V2HTTPError) as caught:
        client.infer("anomaly", READINGS, cast=False)
    assert caught.value.status_code == 401
    wrong = client.post("/v2/models/anomaly/infer", json=BODY, headers={"authorization": "s3cret"})
    assert wrong.status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    answer = client.post("/v2/models/anomaly/infer", json=BODY, headers=auth)
    assert answer.status_code == 200 and answer.json()["model_name"] == "anomaly"
    assert client.get("/v2/models/anomaly/ready", headers=auth).status_code == 200


def test_health_can_be_closed_too(
    v2_client: SyncFactory, repository: Path, example: ModuleType
) -> None:
    app = example.create_app("s3cret", open_health=False, repository=repository)
    client = v2_client(app, wait_ready=False)
    assert client.get("/v2/health/live").status_code == 401
    assert client.get("/v2/health/live", headers={"authorization": "Bearer s3cret"}).json() == {
        "live": True
    }


def test_the_token_is_required(example: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXAMPLE_API_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="set EXAMPLE_API_TOKEN"):
        example.create_app()
