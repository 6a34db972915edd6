"""An "image" model with stages, in numpy alone: what is the dominant colour of a picture?

- ``preprocess`` (per request, in parallel across the pool's workers): decode one
  binary PPM image (``P6``, the simplest image file there is), resize it to
  ``parameters.size`` pixels square, normalise it to a ``[1, 3, size, size]`` float32
  tensor. A request carries one image; a file that is not a PPM is a 400.
- ``predict`` (on batches the adaptive batcher merged): one linear layer over the whole
  picture for every image of the batch at once, as a vision network's first layer would.
- ``postprocess`` (per request): the best label and its probability.

Serve it with ``python -m v2mount --repository examples/stages``; ``ppm`` makes a test
image.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from v2mount import InferenceRequest, Model
from v2mount.errors import BadRequest
from v2mount.types import InferenceResponse

LABELS = ("red", "green", "blue", "white", "black")
#: Each label's colour, as RGB in [0, 1].
PROTOTYPES = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=np.float32)
MEAN, STD = 0.5, 0.25
#: Magic number, width, height, maximum value, then exactly one whitespace byte.
_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s")


def ppm(pixels: np.ndarray[Any, Any]) -> bytes:
    """A binary PPM file of an ``[height, width, 3]`` uint8 array."""
    height, width, _ = pixels.shape
    return b"P6\n%d %d\n255\n" % (width, height) + pixels.astype(np.uint8).tobytes()


def decode_ppm(data: bytes) -> np.ndarray[Any, Any]:
    """The ``[height, width, 3]`` uint8 pixels of a binary PPM file (``BadRequest`` if not)."""
    header = _HEADER.match(data)
    if header is None or header[3] != b"255":
        raise BadRequest("the image is not an 8-bit binary PPM file")
    shape = (int(header[2]), int(header[1]), 3)
    pixels = memoryview(data)[header.end() :]
    if len(pixels) != shape[0] * shape[1] * 3:
        raise BadRequest(f"the image does not hold {shape[1]}x{shape[0]} pixels")
    return np.frombuffer(pixels, np.uint8).reshape(shape)


class ColourClassifier(Model):
    def load(self) -> None:
        self.size = int(getattr(self.settings.parameters, "size", 64))
        # A linear layer whose logits are minus the squared distance of the picture's mean
        # colour to each prototype (up to a constant): a stand-in for trained weights.
        pixels = self.size * self.size
        centre = (PROTOTYPES - MEAN) / STD  # prototypes, normalised as inputs are
        self.weights = np.repeat(2 * centre.T / pixels, pixels, axis=0).astype(np.float32)
        self.bias = -(centre**2).sum(axis=1).astype(np.float32)

    def preprocess(self, payload: InferenceRequest) -> dict[str, Any]:
        images = payload["image"]
        if images.shape != (1,):
            raise BadRequest("send one image per request")
        pixels = decode_ppm(images[0])
        rows = np.arange(self.size) * pixels.shape[0] // self.size
        cols = np.arange(self.size) * pixels.shape[1] // self.size
        resized = pixels[rows][:, cols].astype(np.float32) / 255
        normalised = (resized - MEAN) / STD
        return {"pixels": normalised.transpose(2, 0, 1)[None]}  # [1, 3, size, size]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        batch = payload["pixels"]
        flat = batch.reshape(len(batch), -1)  # [n, 3 * size * size], channel-major
        return {"logits": flat @ self.weights + self.bias}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        logits = response.output("logits").data
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return {
            "label": np.array([LABELS[i] for i in best], dtype=object),
            "probability": probabilities[np.arange(len(best)), best].astype(np.float32),
        }
