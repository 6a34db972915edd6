"""The benchmark models as ``v2mount.Model`` subclasses (logic in ``bench_core``)."""

from __future__ import annotations

from typing import Any

import bench_core

import v2mount

__all__ = ["EchoModel", "HeavyModel", "TinyModel", "VectorModel"]


class TinyModel(v2mount.Model):
    #: What ``bench_core.Tiny`` imports to unpickle its LogisticRegression: a pool's
    #: template imports it once, its workers share it.
    preload = ("joblib", "sklearn.linear_model")

    def load(self) -> None:
        self.core = bench_core.Tiny(str(self.settings.resolve_uri()))

    def predict(self, payload: v2mount.InferenceRequest) -> dict[str, Any]:
        return {"predict": self.core.predict(payload["x"])}


class HeavyModel(v2mount.Model):
    def load(self) -> None:
        self.core = bench_core.Heavy(str(self.settings.resolve_uri()))

    def predict(self, payload: v2mount.InferenceRequest) -> dict[str, Any]:
        return {"y": self.core.predict(payload["x"])}


class VectorModel(v2mount.Model):
    def load(self) -> None:
        self.core = bench_core.Vector(str(self.settings.resolve_uri()))

    def predict(self, payload: v2mount.InferenceRequest) -> dict[str, Any]:
        return {"y": self.core.predict(payload["x"])}


class EchoModel(v2mount.Model):
    """Returns its input ``x`` as ``y`` (for the payload-size scenario)."""

    def predict(self, payload: v2mount.InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"]}
