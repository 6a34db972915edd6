"""The example repository, copied and trained once per session, and the example apps."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``examples/models`` whose iris artefact ``train.py`` has just written."""
    copy = tmp_path_factory.mktemp("examples") / "models"
    shutil.copytree(EXAMPLES / "models", copy, ignore=shutil.ignore_patterns("model.joblib"))
    done = subprocess.run(
        [sys.executable, str(copy / "iris" / "train.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "training accuracy" in done.stdout and (copy / "iris" / "model.joblib").is_file()
    return copy


@pytest.fixture(scope="session")
def examples() -> Path:
    return EXAMPLES


def _load(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"v2mount_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_example() -> Callable[[str], ModuleType]:
    """``load_example("fastapi_app")`` imports ``examples/<name>.py`` by path."""
    return _load
