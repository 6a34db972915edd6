"""The runtimes package: MLServer names, public surface, and no framework imported early."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import v2mount.runtimes
from v2mount.model import Model
from v2mount.repository import import_implementation
from v2mount.runtimes._base import import_extra


def test_public_surface() -> None:
    assert sorted(v2mount.runtimes.__all__) == [
        "ALIASES",
        "CallableModel",
        "LightGBMModel",
        "OnnxModel",
        "SKLearnModel",
        "XGBoostModel",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "v2mount.codecs.content",
        "v2mount.runtimes",
        "v2mount.runtimes.callable",
        "v2mount.runtimes.lightgbm",
        "v2mount.runtimes.onnx",
        "v2mount.runtimes.sklearn",
        "v2mount.runtimes.xgboost",
    ],
)
def test_every_export_exists(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__)
    for attribute in module.__all__:
        assert hasattr(module, attribute), f"{name}.{attribute}"


@pytest.mark.parametrize(
    ("mlserver_name", "ours"),
    [
        ("mlserver_sklearn.SKLearnModel", v2mount.runtimes.SKLearnModel),
        ("mlserver_sklearn.sklearn.SKLearnModel", v2mount.runtimes.SKLearnModel),
        ("mlserver_xgboost.XGBoostModel", v2mount.runtimes.XGBoostModel),
        ("mlserver_xgboost.xgboost.XGBoostModel", v2mount.runtimes.XGBoostModel),
        ("mlserver_lightgbm.LightGBMModel", v2mount.runtimes.LightGBMModel),
        ("mlserver_lightgbm.lightgbm.LightGBMModel", v2mount.runtimes.LightGBMModel),
        ("mlserver_onnx.OnnxModel", v2mount.runtimes.OnnxModel),
        ("mlserver_onnx.onnx.OnnxModel", v2mount.runtimes.OnnxModel),
    ],
)
def test_mlserver_names_import_our_runtimes(mlserver_name: str, ours: type[Model]) -> None:
    assert import_implementation(mlserver_name) is ours
    assert mlserver_name in v2mount.runtimes.ALIASES


def test_importing_runtimes_imports_no_framework() -> None:
    code = (
        "import sys, pickle, v2mount.runtimes as r\n"
        "pickle.dumps(r.SKLearnModel(name='m', parameters={'uri': 'x'}))\n"
        "heavy = {'sklearn', 'joblib', 'xgboost', 'lightgbm', 'onnxruntime', 'onnx', 'pandas'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_a_missing_extra_names_the_install_command() -> None:
    with pytest.raises(ImportError, match=r"pip install 'v2mount\[nothing\]'"):
        import_extra("v2mount_no_such_framework", "nothing")
