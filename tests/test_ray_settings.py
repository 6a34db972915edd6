"""Choosing the Ray pool backend in settings; no Ray is started here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from v2mount.settings import ModelSettings, Settings


def test_settings_choose_the_backend_and_check_actor_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().pool_backend == "process"
    monkeypatch.setenv("V2MOUNT_POOL_BACKEND", "ray")
    monkeypatch.setenv("V2MOUNT_RAY_ADDRESS", "auto")
    assert (Settings().pool_backend, Settings().ray_address) == ("ray", "auto")
    settings = ModelSettings(name="m", pool_backend="ray", ray_actor_options={"num_gpus": 0.5})
    assert settings.ray_actor_options.ray_options() == {
        "num_cpus": 1,
        "num_gpus": 0.5,
        "resources": {},
    }
    with pytest.raises(ValueError, match="pool_backend"):
        ModelSettings(name="m", pool_backend="threads")
    with pytest.raises(ValueError, match="num_cpu"):
        ModelSettings(name="m", ray_actor_options={"num_cpu": 1})


def test_v2mount_does_not_import_ray_unless_a_pool_uses_it() -> None:
    code = (
        "import sys, v2mount, v2mount.ray_pool, v2mount.ray_actor, v2mount.registry\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
