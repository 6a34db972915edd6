"""The framework runtimes, with a ``load`` that fails if it imported any framework module
(loaded by path: the pool's template executes this file)."""

from __future__ import annotations

import sys

from v2mount.model import Model
from v2mount.runtimes import LightGBMModel, OnnxModel, SKLearnModel, XGBoostModel

FRAMEWORKS = {"joblib", "lightgbm", "onnxruntime", "pandas", "scipy", "sklearn", "xgboost"}


class ImportsNothing(Model):
    """Raises from ``load`` (so the pool's start fails) naming what it had to import."""

    def load(self) -> None:
        before = set(sys.modules)
        super().load()
        new = sorted(m for m in set(sys.modules) - before if m.partition(".")[0] in FRAMEWORKS)
        if new:
            raise RuntimeError(f"load imported {len(new)} modules: {', '.join(new[:3])}")


class SKLearn(ImportsNothing, SKLearnModel):
    pass


class XGBoost(ImportsNothing, XGBoostModel):
    pass


class LightGBM(ImportsNothing, LightGBMModel):
    pass


class Onnx(ImportsNothing, OnnxModel):
    pass


class BareSKLearn(SKLearn):
    """Preloads nothing: its load must import scikit-learn (the tests' control)."""

    preload = ()
