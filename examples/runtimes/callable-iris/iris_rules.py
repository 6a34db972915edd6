"""A hand-written iris classifier served by ``CallableModel`` (see model-settings.json)."""

from __future__ import annotations

from typing import Any

import numpy as np


def predict(inputs: dict[str, Any]) -> dict[str, list[str]]:
    """Two petal thresholds separate the three species well."""
    length = np.asarray(inputs["petal_length"], dtype=np.float64)
    width = np.asarray(inputs["petal_width"], dtype=np.float64)
    species = np.where(length < 2.5, "setosa", np.where(width < 1.75, "versicolor", "virginica"))
    return {"species": species.tolist()}
