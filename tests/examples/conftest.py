"""The example repository, copied and trained once per session, and the example apps."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import load_module

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


@pytest.fixture(scope="session")
def load_example() -> Callable[[str], ModuleType]:
    """``load_example("fastapi_app")`` imports ``examples/<name>.py`` by path."""
    return lambda name: load_module(EXAMPLES / f"{name}.py", f"v2mount_example_{name}")
