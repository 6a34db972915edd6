"""Models the pool tests run in worker processes (importable by name in the workers)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np

from v2mount.errors import BadRequest
from v2mount.model import Model
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest

logger = logging.getLogger("pool_models")


class Echo(Model):
    """Returns each input unchanged; ``parameters`` steer the odd behaviours under test."""

    name = "echo"

    def load(self) -> None:
        print("echo loading", flush=True)
        self.metrics.counter("echo_loads", documentation="loads")

    def predict(self, payload: InferenceRequest) -> Any:
        action = payload.parameters.get("action")
        if action == "sleep":
            time.sleep(float(payload.parameters["seconds"]))
        elif action == "raise":
            raise ValueError("bad input, refused")
        elif action == "bad_request":
            raise BadRequest("you asked for it")
        elif action == "exit":
            os._exit(3)
        elif action == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif action == "log":
            logger.warning("predict saw %s", payload.id)
            print("to stderr", file=sys.stderr, flush=True)
        elif action == "env":
            from threadpoolctl import threadpool_info

            names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            return {
                "env": np.array([os.environ.get(n, "").encode() for n in names], object),
                "pools": np.array([pool["num_threads"] for pool in threadpool_info()]),
            }
        elif action == "pid":
            return {"pid": np.array([os.getpid()], np.int64)}
        self.metrics.counter("echo_calls", labels={"model": "echo"})
        return {tensor.name: tensor.data for tensor in payload.inputs}


class Sleepy(Model):
    """Holds its worker for ``seconds`` (a stand-in for a slow model)."""

    name = "sleepy"

    def predict(self, payload: InferenceRequest) -> Any:
        time.sleep(float(payload["seconds"][0]))
        return {"slept": payload["seconds"]}


class AsyncDouble(Model):
    """Async load and predict; the loop must be the same across requests."""

    name = "async-double"

    async def load(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.loop_ids: set[int] = set()
        self.settings.inputs = [TensorSpec(name="x", datatype="FP32", shape=[-1])]

    async def predict(self, payload: InferenceRequest) -> Any:
        import asyncio

        await anyio.lowlevel.checkpoint()
        self.loop_ids.add(id(asyncio.get_running_loop()))
        return {"y": payload["x"] * 2, "loops": np.array([len(self.loop_ids)], np.int64)}


class FailsToLoad(Model):
    name = "broken"

    def load(self) -> None:
        raise RuntimeError("weights file is missing")


class DiesInLoad(Model):
    name = "dies"

    def load(self) -> None:
        os._exit(7)
