"""Models the template tests run (loaded by path: the template executes this file).

Importing it prints a line, which the template must pass on to the pool's log.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest

print("template_models imported", flush=True)


class Draw(Model):
    """Draws from numpy's global random generator at load; says which process it is."""

    name = "draw"

    def load(self) -> None:
        self.first = float(np.random.random())

    def predict(self, payload: InferenceRequest) -> Any:
        time.sleep(float(payload.parameters.get("seconds", 0.0)))
        return {
            "pid": np.array([os.getpid()]),
            "ppid": np.array([os.getppid()]),
            "first": np.array([self.first]),
        }


class Unpicklable(Model):
    """Refuses to be unpickled in any process but the one that made it."""

    name = "unpicklable"

    def __init__(self) -> None:
        super().__init__()
        self.maker = os.getpid()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["maker"] != os.getpid():
            raise RuntimeError("unpickled in another process")
        self.__dict__.update(state)
