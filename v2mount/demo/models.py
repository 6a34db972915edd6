"""Two small numpy models: an echo of any tensors and a linear classifier from weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest

__all__ = ["Identity", "LinearClassifier"]


class Identity(Model):
    """Returns every input unchanged, under the same name (any datatype, any shape)."""

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


class LinearClassifier(Model):
    """Softmax of ``x @ W + b``, with ``W`` and ``b`` from the ``.npz`` at parameters.uri."""

    def load(self) -> None:
        path = self.settings.resolve_uri()
        if path is None:
            raise ValueError("parameters.uri must name the weights file")
        with np.load(path) as weights:
            self.weights = weights["W"].astype(np.float32)
            self.bias = weights["b"].astype(np.float32)

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        logits = payload["x"] @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        scores = np.exp(logits)
        scores /= scores.sum(axis=1, keepdims=True)
        return {"scores": scores, "label": scores.argmax(axis=1).astype(np.int64)}
