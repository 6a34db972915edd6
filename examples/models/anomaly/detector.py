"""A pure-numpy model: flags sensor readings far from a saved baseline.

The baseline (per-feature mean and standard deviation) is a small JSON file named by
``parameters.uri``; ``parameters.threshold`` is the default cut-off, and a request may
send its own ``threshold`` parameter.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from v2mount import InferenceRequest, Model


class ZScoreDetector(Model):
    """``score`` is each row's largest absolute z-score; ``anomaly`` is score > threshold."""

    def load(self) -> None:
        path = self.settings.resolve_uri()
        if path is None:
            raise ValueError("parameters.uri must name the baseline file")
        baseline = json.loads(path.read_text(encoding="utf-8"))
        self.mean = np.asarray(baseline["mean"], np.float32)
        self.std = np.asarray(baseline["std"], np.float32)
        self.threshold = float(getattr(self.settings.parameters, "threshold", 3.0))

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        threshold = float(payload.parameters.get("threshold", self.threshold))
        score = np.abs((payload["readings"] - self.mean) / self.std).max(axis=1)
        return {"score": score, "anomaly": score > threshold}
