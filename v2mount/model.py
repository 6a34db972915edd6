"""The ``Model`` base class that users subclass, and turning its answer into a response.

A model overrides ``load`` and ``predict``; each may be plain or ``async``. ``predict``
receives the decoded ``InferenceRequest`` (a mapping of input name → numpy array, with
``id``, ``parameters`` and requested ``outputs`` on it) and returns a mapping of output
name → array-like, a single array (for a model with one output), or a full
``InferenceResponse`` when it needs per-output parameters. A model may also override
``preprocess`` and ``postprocess``, the stages that run per request around a batched
``predict`` (``v2mount.stages``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from v2mount.codecs.tensor import (
    array_to_datatype,
    cast_lossless,
    datatype_to_dtype,
    to_output_array,
)
from v2mount.errors import ModelError, V2MountError
from v2mount.metadata import shape_matches
from v2mount.metrics.custom import CustomMetrics
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

__all__ = [
    "MethodRunner",
    "Model",
    "build_response",
    "call_load",
    "call_predict",
    "call_predict_sync",
    "conform_outputs",
    "has_postprocess",
    "preload_modules",
]

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
    #: With one declared input, accept a single input of any name (MLServer's framework
    #: runtimes do); custom models keep strict names.
    any_input_name: ClassVar[bool] = False
    inputs: ClassVar[list[TensorSpec | dict[str, Any]]] = []
    outputs: ClassVar[list[TensorSpec | dict[str, Any]]] = []
    #: Modules the pool's template process imports before it forks this model's workers
    #: (the framework ``load`` imports): a worker, and each replacement, starts with them
    #: imported and shares their memory. ``preload`` in the settings adds more.
    preload: ClassVar[tuple[str, ...]] = ()

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

    def preprocess(self, payload: InferenceRequest) -> Any:
        """Turn one client request into what ``predict`` takes (override to use it).

        May be ``async``. Returns a mapping of input name → array-like, or an
        ``InferenceRequest``; runs per request, where ``predict`` runs (a worker process
        of the pool, or this process), before the adaptive batcher, which merges the
        preprocessed requests. An exception answers this request alone with a 500 naming
        the stage; a ``V2MountError`` keeps its status.
        """
        return payload

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        """Turn ``predict``'s answer for one request into the client's (override to use it).

        May be ``async``. ``payload`` is the request as the client sent it (before
        ``preprocess``); ``response`` holds this request's rows of ``predict``'s outputs,
        unchecked. Returns what ``predict`` may return; that is checked against the
        declared outputs. Runs per request, where ``preprocess`` does.
        """
        return response


def preload_modules(model: Model) -> tuple[str, ...]:
    """What a template imports for ``model``: the class's ``preload``, then the settings'.

    ``TypeError`` if the class's ``preload`` is not a tuple or list of names (a lone
    string would be read letter by letter).
    """
    declared = type(model).preload
    if not isinstance(declared, (tuple, list)) or not all(isinstance(n, str) for n in declared):
        raise TypeError(
            f"{type(model).__name__}.preload must be a tuple of module names, not {declared!r}"
        )
    return tuple(dict.fromkeys((*declared, *model.settings.preload)))


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


class MethodRunner:
    """Runs a model's plain or ``async`` methods from a plain thread (a worker process, a
    Ray actor); the ``async`` ones share one private event loop for the runner's life."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, method: Callable[..., Any], *args: Any) -> Any:
        result = method(*args)
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        return result

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


def _array(tensor: Tensor) -> np.ndarray[Any, Any]:
    """The tensor's data as an array of its shape (a ``Tensor`` may hold a list)."""
    data: Any = tensor.data
    try:
        if not isinstance(data, np.ndarray):
            if tensor.datatype == "BYTES":
                data = to_output_array(np.array(data, dtype=object), tensor.name)
            else:
                data = np.asarray(data, dtype=datatype_to_dtype(tensor.datatype))
        if data.shape != tuple(tensor.shape):
            data = data.reshape(tuple(tensor.shape))
    except (ValueError, TypeError, OverflowError, V2MountError) as exc:
        message = exc.message if isinstance(exc, V2MountError) else str(exc)
        raise ModelError(
            f"output {tensor.name!r}: its data is not {tensor.datatype} of shape "
            f"{list(tensor.shape)}: {message}"
        ) from None
    array: np.ndarray[Any, Any] = data
    return array


def _conform(tensor: Tensor, spec: TensorSpec | None, model_name: str) -> Tensor:
    """An output checked against its declaration: cast losslessly, ``[N]`` → ``[N, 1]``.

    A mismatch is the model's fault: ``ModelError`` (500) naming the output.
    """
    array = _array(tensor)
    if spec is None:
        return Tensor(tensor.name, tensor.datatype, array.shape, array, tensor.parameters)
    if array.dtype != datatype_to_dtype(spec.datatype) or tensor.datatype != spec.datatype:
        cast = cast_lossless(array, spec.datatype, output=True)
        if cast is None:
            raise ModelError(
                f"model {model_name!r}: output {tensor.name!r} is {tensor.datatype}, which "
                f"does not convert to the declared {spec.datatype} without loss"
            )
        array = cast
    shape = array.shape
    if not shape_matches(spec.shape, shape):
        if spec.shape[-1:] == [1] and shape_matches(spec.shape, (*shape, 1)):
            array = array.reshape((*shape, 1))  # a 1-D answer declared [-1, 1], as MLServer
        else:
            raise ModelError(
                f"model {model_name!r}: output {tensor.name!r} has shape {list(shape)}, "
                f"which does not match the declared {spec.shape}"
            )
    return Tensor(tensor.name, spec.datatype, array.shape, array, tensor.parameters)


def conform_outputs(settings: ModelSettings, outputs: list[Tensor]) -> list[Tensor]:
    """Outputs checked against the declared ones (names, datatypes, shapes).

    With no declared outputs, anything goes (lists become arrays). Otherwise every
    output must be declared; see ``_conform`` for datatypes and shapes.
    """
    declared = {spec.name: spec for spec in settings.outputs}
    conformed = []
    for tensor in outputs:
        spec = declared.get(tensor.name)
        if spec is None and declared:
            raise ModelError(
                f"model {settings.name!r} returned output {tensor.name!r}, which it does not "
                f"declare; declared: {', '.join(map(repr, declared))}"
            )
        conformed.append(_conform(tensor, spec, settings.name))
    return conformed


def _tensor(name: str, value: Any) -> Tensor:
    array = to_output_array(value, name)
    return Tensor(name, array_to_datatype(array), tuple(array.shape), array)


def has_postprocess(model: Model) -> bool:
    """Whether the model overrides ``Model.postprocess``."""
    return type(model).postprocess is not Model.postprocess


def build_response(
    model: Model, request: InferenceRequest, result: Any, *, final: bool | None = None
) -> InferenceResponse:
    """Normalise what ``predict`` (or ``postprocess``) returned into an ``InferenceResponse``.

    When ``final`` (by default: unless a ``postprocess`` stage follows), its outputs are
    checked against the declared ones (``conform_outputs``); it carries the request's
    ``id``.
    """
    settings = model.settings
    if final is None:
        final = not has_postprocess(model)
    if isinstance(result, InferenceResponse):
        result.model_name = settings.name
        result.model_version = settings.version
        if result.id is None:
            result.id = request.id
        if final:
            result.outputs = conform_outputs(settings, result.outputs)
        return result
    if type(result) is dict or isinstance(result, Mapping):  # the ABC check costs more
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
        outputs = [_tensor(str(name), value) for name, value in items]
    except V2MountError:
        raise
    except (ValueError, TypeError) as exc:
        raise ModelError(f"predict returned data that is not a tensor: {exc}") from None
    if final and settings.outputs:  # undeclared, these arrays already conform
        outputs = conform_outputs(settings, outputs)
    return InferenceResponse(settings.name, outputs, settings.version, request.id)
