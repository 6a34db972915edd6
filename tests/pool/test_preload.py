"""Modules a pool's template imports before forking workers (``Model.preload`` and the
``preload`` setting; ``v2mount/pool/_template.py``).

Each preloaded test module records the pid that imported it; a worker reads that in its
``load`` and answers it with its own pid and its parent's. Linux only, where templates
are used.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from tests.support import eventually, ignore, load_module, name_of
from v2mount import V2App
from v2mount.errors import ModelNotReady
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.pool._shipping import pack_model
from v2mount.pool._template import TEMPLATE_NAME
from v2mount.settings import ModelSettings
from v2mount.types import InferenceRequest, Tensor

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="templates need Linux pidfds"),
]

HERE = Path(__file__).parent
RECORDS_PID = "import os\nIMPORTED_IN = os.getpid()\n"
STARTS_A_THREAD = (
    "import threading\n"
    "threading.Thread(target=threading.Event().wait, name='preloaded', daemon=True).start()\n"
)


#: Loaded by path: the template must execute it by file, as workers do.
models = load_module(HERE / "preload_models.py", "v2mount_test_preload_models")


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on ``sys.path`` (the template inherits it) for the modules to preload."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{models.PROBE}.py").write_text(RECORDS_PID)
    return tmp_path


def request() -> InferenceRequest:
    return InferenceRequest([Tensor("x", "FP32", (1,), np.zeros(1, np.float32))])


async def answer(pool: WorkerPool) -> dict[str, list[int]]:
    response = await pool.infer(request())
    return {tensor.name: tensor.data.tolist() for tensor in response.outputs}


async def test_preloaded_modules_are_imported_once_in_the_template(modules: Path) -> None:
    (modules / "v2mount_preload_extra.py").write_text(RECORDS_PID)
    model = models.Probe(preload=["v2mount_preload_extra"])
    pool = WorkerPool(model, PoolConfig(1, 4), metrics_sink=ignore)
    await pool.start()
    try:
        first = await answer(pool)
        template = first["ppid"][0]
        assert name_of(template) == TEMPLATE_NAME
        # The class's module and the settings' one were imported by the template, before
        # the worker's load ran (and so not in the worker).
        assert first["imported_in"] == [template, template]
        assert first["pid"] != [template]
        victim = first["pid"][0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: pool.statistics().live_workers == 1 and victim not in pool.pids())
        # The replacement found them imported too: nobody imported them again.
        second = await answer(pool)
        assert second["pid"] != [victim]
        assert second["imported_in"] == [template, template] and second["ppid"] == [template]
    finally:
        await pool.stop()
    assert models.PROBE not in sys.modules  # this process never imported it


async def test_a_preload_that_fails_is_logged_once_and_the_model_still_loads(
    modules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (modules / "v2mount_preload_broken.py").write_text("raise RuntimeError('broken on import')\n")
    missing = "v2mount_preload_missing"
    model = models.Probe(preload=["v2mount_preload_broken", missing])
    pool = WorkerPool(model, PoolConfig(1, 4), metrics_sink=ignore)
    await pool.start()
    try:
        first = await answer(pool)
        template = first["ppid"][0]
        assert name_of(template) == TEMPLATE_NAME
        # The probe module, listed first, was imported; the failed ones are not there.
        assert first["imported_in"] == [template, 0, 0]
        victim = first["pid"][0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: pool.statistics().live_workers == 1 and victim not in pool.pids())
        assert (await answer(pool))["ppid"] == [template]
    finally:
        await pool.stop()
    warnings = [r.getMessage() for r in caplog.records if "could not preload" in r.getMessage()]
    assert warnings == [
        "model probe: the template could not preload 'v2mount_preload_broken' (RuntimeError: "
        "broken on import); each worker's load imports what it needs itself",
        f"model probe: the template could not preload {missing!r} (ModuleNotFoundError: No "
        f"module named {missing!r}); each worker's load imports what it needs itself",
    ]


async def test_a_preload_that_starts_a_thread_is_left_out_of_a_new_template(
    modules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (modules / "v2mount_preload_threaded.py").write_text(STARTS_A_THREAD)
    (modules / "v2mount_preload_after.py").write_text(RECORDS_PID)
    model = models.Probe(preload=["v2mount_preload_threaded", "v2mount_preload_after"])
    pool = WorkerPool(model, PoolConfig(1, 4), metrics_sink=ignore)
    await pool.start()
    try:
        answered = await answer(pool)
    finally:
        await pool.stop()
    # Still forked from a template, which imported the modules before and after the
    # culprit but not the culprit (a forked process keeps only the forking thread).
    template = answered["ppid"][0]
    assert template != os.getpid()
    assert answered["imported_in"] == [template, 0, template]
    assert (
        "model probe: importing the preloaded module 'v2mount_preload_threaded' started a "
        "thread; starting a template without it" in caplog.text
    )


async def test_a_shared_pool_template_preloads_the_modules_of_every_model(
    serve: Any, modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(HERE))  # preload_models importable by name
    for extra in ("v2mount_preload_of_a", "v2mount_preload_of_b"):
        (modules / f"{extra}.py").write_text(RECORDS_PID)
    for folder, extra in (("a", "v2mount_preload_of_a"), ("b", "v2mount_preload_of_b")):
        document = {
            "implementation": "preload_models.Probe",
            "preload": [extra],
            "pool": "shared",
            "parallel_workers": 1,
        }
        (modules / "repo" / folder).mkdir(parents=True)
        (modules / "repo" / folder / "model-settings.json").write_text(json.dumps(document))
    app = V2App(repository=modules / "repo")
    async with serve(app) as client:
        answers = {}
        for model in ("a", "b"):
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}
            response = await client.post(f"/v2/models/{model}/infer", json=body)
            assert response.status_code == 200, response.text
            answers[model] = {o["name"]: o["data"] for o in response.json()["outputs"]}
        template = answers["a"]["ppid"][0]
        assert name_of(template) == TEMPLATE_NAME
    # One worker, forked from one template, which imported both models' modules.
    assert answers["b"]["ppid"] == [template] and answers["a"]["pid"] == answers["b"]["pid"]
    assert answers["a"]["imported_in"] == answers["b"]["imported_in"] == [template, template]


def test_the_template_receives_the_class_preloads_then_the_settings_ones() -> None:
    model = models.Probe(preload=["json", models.PROBE, "email.parser"])
    assert pack_model(model).preload == (models.PROBE, "json", "email.parser")


class Misdeclared(models.Probe):  # type: ignore[name-defined,misc]
    preload = "sklearn"  # a string, not a tuple of names


async def test_a_class_preload_that_is_not_a_tuple_of_names_fails_the_start_clearly() -> None:
    pool = WorkerPool(Misdeclared(), PoolConfig(1, 4), metrics_sink=ignore)
    with pytest.raises(ModelNotReady, match=r"Misdeclared.preload must be a tuple of module"):
        await pool.start()
    await pool.stop()


@pytest.mark.parametrize("name", ["", "has space", "trailing.", "1st", "a..b", "x/y"])
def test_a_preload_that_is_not_a_module_name_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="is not a module name"):
        ModelSettings(name="m", preload=[name])
