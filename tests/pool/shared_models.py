"""Models the shared-pool tests serve together in one pool's workers."""

from __future__ import annotations

import gc
import os
import time
import weakref
from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest, InferenceResponse

#: The ``Heavy`` models alive in this process (a worker), for ``Census`` to count.
LIVE: weakref.WeakSet[Model] = weakref.WeakSet()


def _steer(payload: InferenceRequest) -> None:
    until = payload.parameters.get("until")
    while until is not None and not os.path.exists(until):  # the test says when
        time.sleep(0.01)
    if "seconds" in payload.parameters:
        time.sleep(float(payload.parameters["seconds"]))
    if payload.parameters.get("action") == "exit":
        os._exit(3)


class Scale(Model):
    """``y = x * factor`` (``parameters.factor``), with the worker's pid."""

    def predict(self, payload: InferenceRequest) -> Any:
        _steer(payload)
        factor = float((self.settings.parameters.model_extra or {}).get("factor", 1))
        return {
            "y": np.asarray(payload["x"], np.float32) * factor,
            "pid": np.array([os.getpid()], np.int64),
        }


class Staged(Model):
    """``y = 10 * x + offset``: preprocess scales, predict adds, postprocess renames."""

    def preprocess(self, payload: InferenceRequest) -> Any:
        return {"scaled": np.asarray(payload["x"], np.float64) * 10}

    def predict(self, payload: InferenceRequest) -> Any:
        offset = float((self.settings.parameters.model_extra or {}).get("offset", 0))
        return {"z": payload["scaled"] + offset}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        return {"y": response.output("z").data}


class Heavy(Model):
    """Holds 16 MB once loaded."""

    def load(self) -> None:
        self.weights = np.ones(4 << 20, np.float32)
        LIVE.add(self)

    def predict(self, payload: InferenceRequest) -> Any:
        return {"y": np.array([self.weights[0]], np.float32)}


class Census(Model):
    """How many ``Heavy`` models this worker holds (after a collection), and its pid."""

    def predict(self, payload: InferenceRequest) -> Any:
        _steer(payload)
        gc.collect()
        return {"live": np.array([len(LIVE)], np.int64), "pid": np.array([os.getpid()], np.int64)}


#: What ``Clingy`` models leave behind: a reference that outlives their unloading.
KEPT: list[Model] = []


class Clingy(Model):
    def load(self) -> None:
        KEPT.append(self)

    def predict(self, payload: InferenceRequest) -> Any:
        return {"y": np.zeros(1, np.float32)}


class FailsToLoad(Model):
    def load(self) -> None:
        raise RuntimeError("no weights here")


class DiesInLoad(Model):
    def load(self) -> None:
        os._exit(7)
