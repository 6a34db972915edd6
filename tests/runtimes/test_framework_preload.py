"""A framework runtime's workers, forked from the pool's template, find the framework
imported already: ``load`` imports none of its modules (each runtime's ``preload``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import ignore, load_module
from v2mount.errors import ModelNotReady
from v2mount.model import Model
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.settings import load_model_settings
from v2mount.types import InferenceRequest, Tensor

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="templates need Linux pidfds"),
]


#: Loaded by path: the template must execute it by file, as workers do.
models = load_module(
    Path(__file__).with_name("framework_preload_models.py"),
    "v2mount_test_runtimes_framework_preload_models",
)


@pytest.fixture
def anyio_backend() -> str:
    """The pool is the same on trio (``tests/pool``): one backend is enough here."""
    return "asyncio"


def example(repository: Path, name: str, cls: type[Model]) -> Model:
    return cls(load_model_settings(repository / name / "model-settings.json"))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sklearn-iris", models.SKLearn),
        ("xgboost-iris", models.XGBoost),
        ("lightgbm-iris", models.LightGBM),
        ("onnx-iris", models.Onnx),
    ],
)
async def test_a_forked_worker_loads_without_importing_its_framework(
    example_repository: Path, iris: np.ndarray, name: str, cls: type[Model]
) -> None:
    pool = WorkerPool(example(example_repository, name, cls), PoolConfig(1, 4), metrics_sink=ignore)
    await pool.start()  # raises ModelNotReady if load imported a framework module
    try:
        features = iris[:2].astype(np.float32 if name == "onnx-iris" else np.float64)
        datatype = "FP32" if name == "onnx-iris" else "FP64"
        response = await pool.infer(
            InferenceRequest([Tensor("input", datatype, features.shape, features)])
        )
        assert response.outputs and response.outputs[0].data.shape[0] == 2
    finally:
        await pool.stop()


async def test_without_preloads_the_worker_imports_the_framework_in_load(
    example_repository: Path,
) -> None:
    model = example(example_repository, "sklearn-iris", models.BareSKLearn)
    pool = WorkerPool(model, PoolConfig(1, 4), metrics_sink=ignore)
    with pytest.raises(ModelNotReady, match=r"load imported \d+ modules: joblib"):
        await pool.start()
    await pool.stop()
