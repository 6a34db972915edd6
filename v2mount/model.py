"""The ``Model`` base class that users subclass, and turning its answer into a response.

A model overrides ``load`` and ``predict``; each may be plain or ``async``. ``predict``
receives the decoded ``InferenceRequest`` (a mapping of input name → numpy array, with
``id``, ``parameters`` and requested ``outputs`` on it) and returns a mapping of output
name → array-like, a single array (for a model with one output), or a full
``InferenceResponse`` when it needs per-output parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from v2mount.codecs.tensor import array_to_datatype, datatype_to_dtype, to_output_array
from v2mount.errors import ModelError, V2MountError
from v2mount.metrics.custom import CustomMetrics
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

__all__ = ["Model", "build_response", "call_load", "call_predict", "call_predict_sync"]

DEFAULT_OUTPUT_NAME = "output-0"


class Model:
    """Base class for a served model.

    Class attributes ``name``, ``platform``, ``inputs`` and ``outputs`` are defaults for
    the settings; values passed to the constructor (or read from ``model-settings.json``)
    win. With ``parallel_workers > 0`` the *unloaded* instance is pickled (with dill) into
    each worker process and ``load`` runs there, once per worker; so load heavy state in
    ``load``, not in ``__init__``.
    """

    name: ClassVar[str | None] = None
    platform: ClassVar[str] = ""
    inputs: ClassVar[list[TensorSpec | dict[str, Any]]] = []
    outputs: ClassVar[list[TensorSpec | dict[str, Any]]] = []

    def __init__(self, settings: ModelSettings | Mapping[str, Any] | None = None, **fields: Any):
        given = (
            settings.model_dump(exclude_unset=True)
            if isinstance(settings, ModelSettings)
            else dict(settings or {})
        )
        given.update(fields)
        defaults: dict[str, Any] = {
            "name": type(self).name or type(self).__name__.lower(),
            "platform": type(self).platform,
            "inputs": list(type(self).inputs),
            "outputs": list(type(self).outputs),
        }
        for key, value in defaults.items():
            if not given.get(key):
                given[key] = value
        given["implementation"] = type(self)
        self.settings: ModelSettings = ModelSettings.model_validate(given)
        self.metrics = CustomMetrics()

    def load(self) -> Any:
        """Load weights and state. Runs once per process that serves the model.

        May be ``async``. Raising marks the model not ready, with the message as reason.
        """
        return None

    def predict(self, payload: InferenceRequest) -> Any:
        """Answer one request (or one merged batch, with adaptive batching on).

        May be ``async``. With ``parallel_workers == 0`` a plain ``predict`` runs in a
        worker thread of the main process and an ``async`` one on the event loop; with a
        pool it runs in a worker process. An exception becomes a 500 carrying its message.
        """
        raise NotImplementedError(f"{type(self).__name__}.predict is not implemented")


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def call_load(model: Model) -> None:
    """Run ``model.load()``, awaiting it if it is a coroutine."""
    await _maybe_await(model.load())


def call_predict_sync(model: Model, request: InferenceRequest) -> InferenceResponse:
    """Run a plain ``predict`` and build the response (no event loop needed)."""
    return build_response(model, request, model.predict(request))


async def call_predict(model: Model, request: InferenceRequest) -> InferenceResponse:
    """Run ``predict`` (plain or async) on the current thread and build the response."""
    return build_response(model, request, await _maybe_await(model.predict(request)))


def _declared(specs: list[TensorSpec]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def _tensor(name: str, value: Any, spec: TensorSpec | None) -> Tensor:
    array = to_output_array(value, name)
    if spec is not None:
        dtype = datatype_to_dtype(spec.datatype)
        if spec.datatype == "BYTES":
            if array.dtype.kind != "O":
                raise ModelError(
                    f"output {name!r} is declared BYTES but the model returned numbers"
                )
        elif array.dtype != dtype:
            try:
                array = array.astype(
                    dtype, casting="same_kind" if array.dtype.kind == "f" else "unsafe"
                )
            except TypeError as exc:
                raise ModelError(
                    f"output {name!r} cannot be cast to {spec.datatype}: {exc}"
                ) from None
        datatype = spec.datatype
    else:
        datatype = array_to_datatype(array)
    return Tensor(name, datatype, tuple(array.shape), array)


def build_response(model: Model, request: InferenceRequest, result: Any) -> InferenceResponse:
    """Normalise what ``predict`` returned into an ``InferenceResponse``."""
    settings = model.settings
    if isinstance(result, InferenceResponse):
        result.model_name = settings.name
        result.model_version = settings.version
        if result.id is None:
            result.id = request.id
        return result
    declared = _declared(settings.outputs)
    if isinstance(result, Mapping):
        items = list(result.items())
    elif isinstance(result, (np.ndarray, list, tuple)):
        name = settings.outputs[0].name if len(settings.outputs) == 1 else DEFAULT_OUTPUT_NAME
        items = [(name, result)]
    else:
        raise ModelError(
            f"predict must return a mapping of output name to array, an array or an "
            f"InferenceResponse; it returned {type(result).__name__}"
        )
    try:
        outputs = [_tensor(str(name), value, declared.get(str(name))) for name, value in items]
    except V2MountError:
        raise
    except (ValueError, TypeError) as exc:
        raise ModelError(f"predict returned data that is not a tensor: {exc}") from None
    return InferenceResponse(settings.name, outputs, settings.version, request.id)
