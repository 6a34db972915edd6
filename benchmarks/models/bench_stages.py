"""The models of ``benchmarks/stages.py``: one piece of work, cut into stages or not.

Per request, an "image" (``[1, 256, 256, 3]`` uint8) is blurred, halved and normalised
(``prepare``: a few ms of numpy on one core, like decoding and resizing a picture), then
a linear layer over the whole picture scores it (``score``: reading a 24 MB weight
matrix dominates, so a batch of 8 costs little more than one row), and the best class
and its probability are kept (``finish``). ``Staged`` runs them as preprocess / predict
/ postprocess; ``Monolith`` runs all three inside ``predict``, row by row for the first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from v2mount import InferenceRequest, Model
from v2mount.types import InferenceResponse

__all__ = ["SIDE", "Monolith", "Staged"]

SIDE = 256
CLASSES = 128

Array = np.ndarray[Any, Any]
_INPUTS = [{"name": "image", "datatype": "UINT8", "shape": [-1, SIDE, SIDE, 3]}]
_OUTPUTS = [
    {"name": "label", "datatype": "INT64", "shape": [-1]},
    {"name": "probability", "datatype": "FP32", "shape": [-1]},
]


def _weights() -> Array:
    rng = np.random.default_rng(11)
    features = 3 * (SIDE // 2) ** 2
    return rng.standard_normal((features, CLASSES), dtype=np.float32) / np.float32(features)


def prepare(image: Array, passes: int) -> Array:
    """One ``[256, 256, 3]`` uint8 picture → ``[3, 128, 128]`` float32, blurred ``passes``
    times, normalised."""
    pixels = image.astype(np.float32) / 255
    for _ in range(passes):
        padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
        pixels = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
    half = pixels[::2, ::2]
    return ((half - half.mean()) / (half.std() + 1e-6)).transpose(2, 0, 1)


def score(batch: Array, weights: Array) -> Array:
    return batch.reshape(len(batch), -1) @ weights


def finish(logits: Array) -> dict[str, Array]:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    best = probabilities.argmax(axis=1)
    return {"label": best, "probability": probabilities[np.arange(len(best)), best]}


def count_call(model: Model, rows: int) -> None:
    """Count a ``predict`` call and its rows (custom metrics: the benchmark's mean batch)."""
    model.metrics.counter("bench_predict_calls")
    model.metrics.counter("bench_predict_rows", rows)


class Staged(Model):
    name = "staged"
    inputs = _INPUTS
    outputs = _OUTPUTS
    #: Blur passes per picture: how heavy the preparation is (set on an instance).
    blur_passes = 1

    def load(self) -> None:
        self.weights = _weights()

    def preprocess(self, payload: InferenceRequest) -> Any:
        passes = self.blur_passes
        return {"pixels": np.stack([prepare(image, passes) for image in payload["image"]])}

    def predict(self, payload: InferenceRequest) -> Any:
        count_call(self, len(payload["pixels"]))
        return {"logits": score(payload["pixels"], self.weights)}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        return finish(response.output("logits").data)


class Monolith(Model):
    name = "monolith"
    inputs = _INPUTS
    outputs = _OUTPUTS
    blur_passes = 1

    def load(self) -> None:
        self.weights = _weights()

    def predict(self, payload: InferenceRequest) -> Any:
        passes = self.blur_passes
        count_call(self, len(payload["image"]))
        pixels = np.stack([prepare(image, passes) for image in payload["image"]])
        return finish(score(pixels, self.weights))
