"""What runs in a Ray actor of a ``RayPool``, and the tuples that cross to and from it.

``ModelActor`` holds one loaded model in a Ray worker process; every method of it is
called there. Requests and replies are plain tuples whose numpy arrays Ray serialises out
of band (large ones through its object store, read zero-copy on the same node), never
pydantic objects or Python lists. This module does not import Ray.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from v2mount.errors import V2MountError, describe_exception
from v2mount.model import MethodRunner, Model, build_response
from v2mount.pool._ipc import DeclaredSpecs, error_to_wire
from v2mount.pool._shipping import ModelPackage, unpack_model
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

__all__ = [
    "ModelActor",
    "RequestWire",
    "ResponseWire",
    "request_from_wire",
    "request_to_wire",
    "response_from_wire",
    "response_to_wire",
]

logger = logging.getLogger("v2mount.pool")

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

TensorWire = tuple[str, str, tuple[int, ...], dict[str, Any], Any]
RequestWire = tuple[
    str | None, dict[str, Any], list[tuple[str, dict[str, Any]]] | None, list[TensorWire]
]
ResponseWire = tuple[str, str | None, str | None, dict[str, Any], list[TensorWire]]


def _tensors_to_wire(tensors: list[Tensor]) -> list[TensorWire]:
    return [(t.name, t.datatype, tuple(t.shape), t.parameters, t.data) for t in tensors]


def _tensors_from_wire(wire: list[TensorWire], own: bool = False) -> list[Tensor]:
    """Tensors of a wire list; ``own``: copy read-only arrays (Ray's zero-copy ones)."""
    tensors = []
    for name, datatype, shape, parameters, data in wire:
        if own and isinstance(data, np.ndarray) and not data.flags.writeable:
            data = data.copy()
        tensors.append(Tensor(name, datatype, shape, data, parameters))
    return tensors


def request_to_wire(request: InferenceRequest) -> RequestWire:
    outputs = request.outputs
    wanted = None if outputs is None else [(out.name, out.parameters) for out in outputs]
    return (request.id, request.parameters, wanted, _tensors_to_wire(request.inputs))


def request_from_wire(wire: RequestWire) -> InferenceRequest:
    """Called in the actor; the model gets arrays of its own, as in a worker process."""
    request_id, parameters, outputs, inputs = wire
    return InferenceRequest(
        inputs=_tensors_from_wire(inputs, own=True),
        id=request_id,
        parameters=parameters,
        outputs=None if outputs is None else [RequestedOutput(n, p) for n, p in outputs],
    )


def response_to_wire(response: InferenceResponse) -> ResponseWire:
    return (
        response.model_name,
        response.model_version,
        response.id,
        response.parameters,
        _tensors_to_wire(response.outputs),
    )


def response_from_wire(wire: ResponseWire) -> InferenceResponse:
    name, version, response_id, parameters, outputs = wire
    return InferenceResponse(name, _tensors_from_wire(outputs), version, response_id, parameters)


class ModelActor:
    """The model in a Ray worker process; every method is called in that process."""

    def __init__(self, package: ModelPackage, threads: int | None) -> None:
        self._package = package
        self._threads = threads
        self._model: Model | None = None
        self._runner: MethodRunner | None = None
        self._watching = threading.Event()

    def load(self) -> tuple[Any, ...]:
        """``("ready", metrics, declared or None, pid)`` or ``("load_failed", text, metrics)``."""
        if self._threads is not None:
            for name in _THREAD_VARIABLES:
                os.environ[name] = str(self._threads)
            try:
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=self._threads)
            except ImportError:
                pass
        try:
            model = self._model = unpack_model(self._package)
            before = DeclaredSpecs.of(model.settings)
            self._runner = MethodRunner(model)
            self._runner.run(model.load)
        except Exception as exc:
            logger.error("loading the model failed", exc_info=True)
            drained = self._model.metrics.drain() if self._model is not None else []
            return ("load_failed", describe_exception(exc), drained)
        after = DeclaredSpecs.of(model.settings)
        return ("ready", model.metrics.drain(), after if after != before else None, os.getpid())

    def predict(self, wire: RequestWire) -> tuple[Any, ...]:
        """``("result", response wire, metrics)`` or ``("error", error wire, metrics)``."""
        model, runner = self._model, self._runner
        assert model is not None and runner is not None
        try:
            request = request_from_wire(wire)
            response = build_response(model, request, runner.run(model.predict, request))
            reply: tuple[Any, ...] = ("result", response_to_wire(response))
        except Exception as exc:
            if not isinstance(exc, V2MountError):
                logger.exception("predict raised")
            reply = ("error", error_to_wire(exc))
        return (*reply, model.metrics.drain())

    def watch(self) -> None:
        """Never returns while the actor lives: its failure tells the pool the actor died."""
        self._watching.wait()
