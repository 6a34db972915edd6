"""Models for the tritonclient tests (imported by the server through PYTHONPATH)."""

from __future__ import annotations

from typing import Any

from v2mount import InferenceRequest, Model


class Echo(Model):
    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {name: payload[name] for name in payload}


class Scale(Model):
    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {"y": payload["x"] * 3}
