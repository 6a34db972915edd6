"""A model whose module seeds numpy's global random generator when imported."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest

np.random.seed(7)


class SeededDraw(Model):
    """Draws from numpy's global random generator at load, seeded by its module."""

    name = "seeded-draw"

    def load(self) -> None:
        self.first = float(np.random.random())

    def predict(self, payload: InferenceRequest) -> Any:
        return {"pid": np.array([os.getpid()]), "first": np.array([self.first])}
