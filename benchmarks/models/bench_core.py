"""Model logic shared by the v2mount and MLServer benchmark models.

Imports neither server, so the same file (and the same weights on disk) runs under
both; ``bench_v2mount`` and ``bench_mlserver`` only adapt it to each server's model API.
Every function is pure numpy / scikit-learn and runs on the calling thread. Start the
servers with one BLAS thread (``OPENBLAS_NUM_THREADS=1``) so that a worker uses one core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HEAVY_ROUNDS",
    "HEAVY_SIZE",
    "VECTOR_FEATURES",
    "VECTOR_HIDDEN",
    "Heavy",
    "Tiny",
    "Vector",
    "write_weights",
]

#: The heavy model multiplies a 512 x 512 float32 matrix 3 times: ≈ 7 ms on one core.
HEAVY_SIZE = 512
HEAVY_ROUNDS = 3
#: Input features and hidden width of the vectorised model: one row costs ≈ 0.8 ms,
#: 32 rows ≈ 3.3 ms, so merging requests pays.
VECTOR_FEATURES = 64
VECTOR_HIDDEN = 1536

Array = np.ndarray[Any, Any]


def write_weights(folder: Path) -> dict[str, Path]:
    """Train / draw every model's weights into ``folder`` (once; no network).

    Returns the file of each model: ``tiny`` (scikit-learn logistic regression on the
    bundled iris data, joblib), ``heavy`` (``.npy``) and ``vector`` (``.npz``).
    """
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tiny": folder / "tiny.joblib",
        "heavy": folder / "heavy.npy",
        "vector": folder / "vector.npz",
    }
    if not files["tiny"].exists():
        features, labels = load_iris(return_X_y=True)
        clf = LogisticRegression(max_iter=1000).fit(features.astype(np.float32), labels)
        joblib.dump(clf, files["tiny"])
    rng = np.random.default_rng(20240601)
    if not files["heavy"].exists():
        square = rng.standard_normal((HEAVY_SIZE, HEAVY_SIZE), dtype=np.float32)
        np.save(files["heavy"], square / np.float32(np.sqrt(HEAVY_SIZE)))
    if not files["vector"].exists():
        np.savez(
            files["vector"],
            w1=rng.standard_normal((VECTOR_FEATURES, VECTOR_HIDDEN), dtype=np.float32) / 8,
            w2=rng.standard_normal((VECTOR_HIDDEN, VECTOR_HIDDEN), dtype=np.float32)
            / np.float32(np.sqrt(VECTOR_HIDDEN)),
            w3=rng.standard_normal((VECTOR_HIDDEN, 1), dtype=np.float32),
        )
    return files


class Tiny:
    """Logistic regression on 4 features: ``predict(x[n, 4]) -> int64[n]``."""

    def __init__(self, path: str | Path) -> None:
        import joblib

        self.clf = joblib.load(path)

    def predict(self, x: Array) -> Array:
        return np.asarray(self.clf.predict(x), dtype=np.int64)


class Heavy:
    """A fixed ≈ 7 ms of BLAS work per call, scaled by the input so it cannot be cached."""

    def __init__(self, path: str | Path) -> None:
        self.square: Array = np.load(path)

    def predict(self, x: Array) -> Array:
        scale = np.float32(1.0 + 1e-3 * float(np.abs(x).sum()))
        product = self.square * scale
        for _ in range(HEAVY_ROUNDS):
            product = np.tanh(product @ self.square)
        return np.asarray(product[: x.shape[0], :4], dtype=np.float32)


class Vector:
    """A two-layer perceptron ``x[n, 64] -> y[n, 1]``: the cost of a call grows slowly with n."""

    def __init__(self, path: str | Path) -> None:
        with np.load(path) as weights:
            self.w1: Array = weights["w1"]
            self.w2: Array = weights["w2"]
            self.w3: Array = weights["w3"]

    def predict(self, x: Array) -> Array:
        hidden = np.tanh(np.tanh(x @ self.w1) @ self.w2)
        return np.asarray(hidden @ self.w3, dtype=np.float32)
