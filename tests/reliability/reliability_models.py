"""Models the reliability suites serve, in worker processes and behind uvicorn.

Loaded by path in the test process (``reliability_models`` fixture) and by name in a
``python -m v2mount`` subprocess (its ``PYTHONPATH`` holds this folder). Each worker's
``load`` leaves a file named after its pid (holding its start time, so a reused pid is
not taken for it) in ``parameters.marker_dir``, so a test can
tell a *loaded* worker from one still starting without reaching into the pool (and
takes a second longer while that folder holds a file ``slow-load``; ``Faulty``'s load
fails, leaving ``failed-<pid>``, while it holds ``fail-load``). A worker stuck in
``Faulty``'s ``hang`` action leaves ``hanging-<pid>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest

__all__ = ["Faulty", "Slow", "start_time"]


def start_time(pid: int) -> str:
    """When ``pid`` started (``/proc/<pid>/stat`` field 22): a pid reused later differs."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[19]


def _mark(model: Model, prefix: str = "") -> None:
    """Leave the marker ``<prefix><pid>`` (holding this process's start time)."""
    folder = (model.settings.parameters.model_extra or {}).get("marker_dir")
    if folder:
        Path(folder, f"{prefix}{os.getpid()}").write_text(start_time(os.getpid()))


def _mark_loaded(model: Model) -> None:
    folder = (model.settings.parameters.model_extra or {}).get("marker_dir")
    if folder and Path(folder, "slow-load").exists():
        time.sleep(1.0)
    _mark(model)


class Faulty(Model):
    """Echoes ``x``; the request's ``action`` parameter picks a failure.

    ``sleep`` (seconds) holds the worker first. Actions: ``raise`` (a plain exception),
    ``exit`` (``os._exit(3)``), ``hang`` (sleeps for an hour), ``pid`` (returns the
    worker's pid), ``leak`` (keeps ``mb`` more megabytes resident for good), ``path``
    (an ``OSError`` naming a file, as a failed ``open`` would).
    """

    name = "faulty"

    def load(self) -> None:
        self.hoard: list[bytes] = []
        folder = (self.settings.parameters.model_extra or {}).get("marker_dir")
        if folder and Path(folder, "fail-load").exists():
            Path(folder, f"failed-{os.getpid()}").touch()
            raise RuntimeError("load refused")
        _mark_loaded(self)

    def predict(self, payload: InferenceRequest) -> Any:
        parameters = payload.parameters
        if parameters.get("sleep"):
            time.sleep(float(parameters["sleep"]))
        action = parameters.get("action")
        if action == "raise":
            raise ValueError("refused: the input is unusable")
        if action == "exit":
            os._exit(3)
        if action == "hang":
            _mark(self, "hanging-")
            time.sleep(3600)
        if action == "path":
            raise FileNotFoundError(2, "No such file or directory", "/srv/secret/weights.bin")
        if action == "leak":
            self.hoard.append(b"\1" * (int(parameters.get("mb", 16)) << 20))
        if action == "pid":
            return {"pid": np.array([os.getpid()], np.int64)}
        return {"x": payload["x"]}


class Slow(Model):
    """Takes ``parameters.seconds`` (default 20 ms) per request: a model of known capacity."""

    name = "slow"

    def load(self) -> None:
        extra = self.settings.parameters.model_extra or {}
        self.seconds = float(extra.get("seconds", 0.02))
        _mark_loaded(self)

    def predict(self, payload: InferenceRequest) -> Any:
        time.sleep(self.seconds)
        return {"x": payload["x"]}
