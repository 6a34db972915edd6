"""Fixtures for the runtime tests: the example repository (built once) and helpers.

The helpers are fixtures (``load_example``, ``make_tensor``, ``infer``) rather than an
importable module, so the tests do not depend on pytest's import mode.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from v2mount.model import Model, call_predict_sync
from v2mount.repository import instantiate
from v2mount.settings import ModelSettings, load_model_settings
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "runtimes" / "build.py"


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("v2mount_examples_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/runtimes/ with every model trained, in a temporary folder."""
    built: Path = _build_module().build(tmp_path_factory.mktemp("examples"))
    return built


@pytest.fixture(scope="session")
def iris() -> np.ndarray:
    from sklearn.datasets import load_iris

    features: np.ndarray = load_iris().data
    return features


def _load_example(repository: Path, name: str, **updates: Any) -> Model:
    """The example ``name`` from its model-settings.json (plus ``updates``), loaded."""
    settings = load_model_settings(repository / name / "model-settings.json")
    if updates:
        settings = ModelSettings.model_validate({**settings.model_dump(), **updates})
    model = instantiate(settings)
    model.load()
    return model


def _tensor(name: str, data: Any, datatype: str | None = None, **parameters: Any) -> Tensor:
    """A request tensor; lists of str become BYTES."""
    if isinstance(data, list) and data and isinstance(data[0], str):
        array = np.empty(len(data), dtype=object)
        array[:] = [item.encode("utf-8") for item in data]
        datatype = datatype or "BYTES"
    else:
        array = np.asarray(data)
    if datatype is None:
        datatype = {"f8": "FP64", "f4": "FP32", "i8": "INT64", "i4": "INT32", "b1": "BOOL"}[
            array.dtype.str[1:]
        ]
    return Tensor(name, datatype, tuple(array.shape), array, dict(parameters))


def _infer(
    model: Model,
    *inputs: Tensor,
    outputs: list[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` on ``inputs`` as the server would; the outputs by name."""
    request = InferenceRequest(
        list(inputs),
        parameters=dict(parameters or {}),
        outputs=None if outputs is None else [RequestedOutput(name) for name in outputs],
    )
    response: InferenceResponse = call_predict_sync(model, request)
    return {out.name: out for out in response.outputs}


@pytest.fixture
def load_example(example_repository: Path) -> Callable[..., Model]:
    """``load_example(name, **settings)``: an example model, loaded in this process."""
    return lambda name, **updates: _load_example(example_repository, name, **updates)


@pytest.fixture
def make_tensor() -> Callable[..., Tensor]:
    """``make_tensor(name, data, datatype=None, **parameters)``."""
    return _tensor


@pytest.fixture
def infer() -> Callable[..., dict[str, Tensor]]:
    """``infer(model, *tensors, outputs=None, parameters=None)``: outputs by name."""
    return _infer
