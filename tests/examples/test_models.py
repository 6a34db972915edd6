"""``examples/models``: the repository ``V2MOUNT_MODEL_REPOSITORY=examples/models`` serves."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from v2mount.testing import V2Client

SyncFactory = Callable[..., V2Client]

READINGS = np.array([[61.0, 2.9, 4.0], [90.0, 2.8, 4.1], [60.0, 0.4, 4.1]], np.float32)
FLOWERS = np.array([[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.7, 3.0, 5.2, 2.3]])


def check_anomaly(client: V2Client) -> None:
    result = client.infer("anomaly", {"readings": READINGS})
    assert result.datatypes == {"score": "FP32", "anomaly": "BOOL"}
    np.testing.assert_allclose(result["score"], [0.4, 6.785714, 4.0], rtol=1e-5)
    assert result["anomaly"].tolist() == [False, True, True]
    lenient = client.infer("anomaly", {"readings": READINGS}, parameters={"threshold": 5})
    assert lenient["anomaly"].tolist() == [False, True, False]


def check_iris(client: V2Client) -> None:
    result = client.infer("iris", {"features": FLOWERS})
    assert result["predict"].tolist() == [[0], [1], [2]]
    assert result["predict_proba"].shape == (3, 3)
    np.testing.assert_allclose(result["predict_proba"].sum(axis=1), 1.0)
    assert client.metadata("iris")["platform"] == "sklearn"


@pytest.mark.slow
def test_the_repository_serves_the_numpy_and_the_sklearn_model(
    v2_client: SyncFactory, models: Path
) -> None:
    client = v2_client(models)
    check_anomaly(client)
    check_iris(client)
    assert sorted(m["name"] for m in client.repository_index()) == ["anomaly", "iris"]


def test_iris_before_training_is_unavailable_with_the_reason(
    v2_client: SyncFactory, tmp_path: Path, examples: Path
) -> None:
    copy = tmp_path / "models"
    shutil.copytree(examples / "models", copy, ignore=shutil.ignore_patterns("model.joblib"))
    client = v2_client(copy, wait_ready=False)
    assert client.ready("anomaly") and not client.ready("iris")
    (entry,) = [m for m in client.repository_index() if m["name"] == "iris"]
    assert entry["state"] == "UNAVAILABLE" and "model.joblib" in entry["reason"]
