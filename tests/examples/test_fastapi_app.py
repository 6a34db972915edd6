"""``examples/fastapi_app.py``: v2mount mounted at ``/ml`` beside the host's routes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from v2mount.testing import V2Client

SyncFactory = Callable[..., V2Client]


@pytest.mark.slow
def test_the_host_routes_and_the_mounted_models(
    v2_client: SyncFactory, models: Path, load_example: Callable[[str], ModuleType]
) -> None:
    example = load_example("fastapi_app")
    client = v2_client(example.create_app(models), prefix="/ml")
    host = client.with_prefix("")
    assert host.get("/orders/7").json() == {"order": 7, "status": "shipped"}
    assert host.get("/healthz").json() == {"status": "ok"}
    assert client.ready("iris") and client.ready("anomaly")
    iris = client.infer("iris", {"features": [[5.1, 3.5, 1.4, 0.2]]}, outputs=["predict"])
    assert list(iris.outputs) == ["predict"] and iris["predict"].tolist() == [[0]]
    anomaly = client.infer("anomaly", {"readings": np.array([[61.5, 2.8, 4.1]])})
    assert anomaly["score"].tolist() == [0.0] and anomaly["anomaly"].tolist() == [False]
    page = client.get("/v2/docs")
    assert page.status_code == 200 and "/ml/v2/docs/openapi.json" in page.text
    assert client.get("/metrics").status_code == 200
    assert host.get("/v2/health/live").status_code == 404  # only under /ml
    assert host.live() is False and client.live()
