"""Models the Ray pool tests run in actors (loaded by path, so shipped as files)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from v2mount.errors import BadRequest
from v2mount.model import Model
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest


class Echo(Model):
    """Returns each input unchanged, after writing to it (inputs must be the model's own)."""

    name = "echo"

    def load(self) -> None:
        self.metrics.counter("echo_loads", documentation="loads")

    def predict(self, payload: InferenceRequest) -> Any:
        outputs = {}
        for tensor in payload.inputs:
            data = tensor.data
            if data.dtype != object and data.size:
                data[...] = data  # raises on a read-only array
            outputs[tensor.name] = data
        outputs["pid"] = np.array([os.getpid()], np.int64)
        return outputs


class Gate(Model):
    """Writes its pid to ``parameters["pidfile"]``, then holds the actor until the file
    ``parameters["gate"]`` exists (a request the test releases when it chooses)."""

    name = "gate"

    def predict(self, payload: InferenceRequest) -> Any:
        params = payload.parameters
        if "pidfile" in params:
            Path(params["pidfile"]).write_text(str(os.getpid()))
        if "gate" in params:
            gate = Path(params["gate"])
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return {"pid": np.array([os.getpid()], np.int64)}


class AsyncDouble(Model):
    """Async load and predict; its load declares the input, where the actor runs it."""

    name = "async-double"

    async def load(self) -> None:
        self.settings.inputs = [TensorSpec(name="x", datatype="FP32", shape=[-1])]

    async def predict(self, payload: InferenceRequest) -> Any:
        return {"y": payload["x"] * 2}


class FailsToLoad(Model):
    name = "broken"

    def load(self) -> None:
        raise RuntimeError("weights file is missing")


class Refuses(Model):
    """Raises what ``parameters["raise"]`` names: the errors must cross as they do."""

    name = "refuses"

    def predict(self, payload: InferenceRequest) -> Any:
        kind = payload.parameters.get("raise")
        if kind == "value":
            raise ValueError("bad input, refused")
        if kind == "bad_request":
            raise BadRequest("you asked for it")
        return {"ok": np.array([1], np.int64)}


class Rows(Model):
    """Returns its input and, for every row, how many rows the call it ran in had."""

    name = "rows"

    def predict(self, payload: InferenceRequest) -> Any:
        x = payload["x"]
        return {"x": x, "rows": np.full(len(x), len(x), np.int64)}
