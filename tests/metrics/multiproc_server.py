"""The app the multiprocess-metrics test serves with ``uvicorn --workers 2``."""

from __future__ import annotations

from typing import Any

from v2mount import InferenceRequest, Model, V2App


class Doubler(Model):
    name = "doubler"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        self.metrics.counter("rows_served", len(payload["x"]))
        self.metrics.gauge("worker_seen", 1, "1 in each worker that served a request")
        return {"y": payload["x"] * 2}


def create() -> V2App:
    return V2App([Doubler()], model_parallel_workers=0)
