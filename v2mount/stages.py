"""Pre- and post-processing stages around ``predict``: what runs where the model runs.

A model that overrides ``Model.preprocess`` or ``Model.postprocess`` is served as::

    request ──preprocess──▶ adaptive batcher ──predict (merged)──▶ split ──postprocess──▶

``preprocess`` and ``postprocess`` run per request; ``predict`` on batches of preprocessed
requests. The functions here run one stage, or the whole chain when batching is off, on
the thread that calls them: a pool's worker process, or a worker thread of the main
process. ``call(method, *args)`` runs a model method, plain or ``async``, and returns
its value (``MethodRunner.run`` in a worker). Each appends how long its stages took to
``timings``, for the ``model_infer_stage_duration_seconds`` histogram. An error names its
stage (``naming``); the parent-side orchestration is ``v2mount.pipeline``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from v2mount.codecs.tensor import array_to_datatype, to_output_array
from v2mount.errors import ModelError, V2MountError, describe_exception
from v2mount.model import Model, build_response, has_postprocess
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

__all__ = [
    "STAGES",
    "Call",
    "Stage",
    "Staged",
    "Timings",
    "as_request",
    "has_preprocess",
    "has_stages",
    "naming",
    "run_pipeline",
    "run_postprocess",
    "run_preprocess",
]

logger = logging.getLogger("v2mount.stages")

Stage = Literal["preprocess", "predict", "postprocess"]
#: The stages timed per request (``predict`` runs per batch: the batcher's metrics).
STAGES: tuple[Stage, ...] = ("preprocess", "postprocess")
#: (stage, seconds) for each stage a call ran.
Timings = list[tuple[str, float]]
#: Runs a model method (plain or ``async``) with arguments and returns its value.
Call = Callable[..., Any]
T = TypeVar("T")
#: A stage's result and the timings of the stages that made it.
Staged = tuple[T, Timings]


def has_preprocess(model: Model) -> bool:
    """Whether the model overrides ``Model.preprocess``."""
    return type(model).preprocess is not Model.preprocess


def has_stages(model: Model) -> bool:
    """Whether the model overrides ``preprocess`` or ``postprocess``."""
    return has_preprocess(model) or has_postprocess(model)


@contextmanager
def naming(model: Model, stage: Stage) -> Iterator[None]:
    """Errors raised inside name ``stage``: a ``V2MountError`` keeps its class (its
    status) with the stage put before its message; anything else becomes a
    ``ModelError`` (500) and its traceback is logged."""
    try:
        yield
    except V2MountError as exc:
        if not exc.message.startswith(f"{stage}: "):
            exc.message = f"{stage}: {exc.message}"
            exc.args = (exc.message,)
        raise
    except Exception as exc:
        logger.error("model %r: %s raised", model.settings.name, stage, exc_info=exc)
        raise ModelError(f"{stage} failed: {describe_exception(exc)}") from exc


def _as_tensor(tensor: Tensor) -> Tensor:
    data = to_output_array(tensor.data, tensor.name)
    if data is tensor.data:
        return tensor
    return Tensor(tensor.name, array_to_datatype(data), data.shape, data, tensor.parameters)


def as_request(original: InferenceRequest, result: Any) -> InferenceRequest:
    """Normalise what ``preprocess`` returned into the request ``predict`` takes.

    A mapping of input name → array-like keeps the original's id, parameters and
    requested outputs; an ``InferenceRequest`` is taken as it is (its id defaulting to
    the original's). Inputs become numpy arrays, so the batcher can merge them.
    """
    if isinstance(result, InferenceRequest):
        inputs = [_as_tensor(tensor) for tensor in result.inputs]
        request_id = result.id if result.id is not None else original.id
        return InferenceRequest(inputs, request_id, result.parameters, result.outputs)
    if isinstance(result, Mapping):
        inputs = []
        for name, value in result.items():
            array = to_output_array(value, str(name))
            inputs.append(Tensor(str(name), array_to_datatype(array), array.shape, array))
        return InferenceRequest(inputs, original.id, dict(original.parameters), original.outputs)
    raise ModelError(
        "preprocess must return a mapping of input name to array or an InferenceRequest; "
        f"it returned {type(result).__name__}"
    )


def run_preprocess(
    model: Model, call: Call, request: InferenceRequest, timings: Timings
) -> InferenceRequest:
    """``preprocess`` one request."""
    start = time.perf_counter()
    with naming(model, "preprocess"):
        prepared = as_request(request, call(model.preprocess, request))
    timings.append(("preprocess", time.perf_counter() - start))
    return prepared


def run_postprocess(
    model: Model,
    call: Call,
    request: InferenceRequest,
    response: InferenceResponse,
    timings: Timings,
) -> InferenceResponse:
    """``postprocess`` one request's rows of ``predict``'s answer."""
    start = time.perf_counter()
    with naming(model, "postprocess"):
        answer = call(model.postprocess, request, response)
        result = build_response(model, request, answer, final=True)
    timings.append(("postprocess", time.perf_counter() - start))
    return result


def run_pipeline(
    model: Model, call: Call, request: InferenceRequest, timings: Timings
) -> InferenceResponse:
    """preprocess → predict → postprocess for one request (batching off): one trip."""
    prepared = run_preprocess(model, call, request, timings) if has_preprocess(model) else request
    with naming(model, "predict"):
        response = build_response(model, prepared, call(model.predict, prepared))
    del prepared
    if has_postprocess(model):
        response = run_postprocess(model, call, request, response, timings)
    return response
