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
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, TypeVar, cast

from v2mount.codecs.tensor import array_to_datatype, to_output_array
from v2mount.errors import ModelError, V2MountError, describe_exception
from v2mount.model import Model, build_response, has_postprocess
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

__all__ = [
    "STAGES",
    "Answered",
    "Call",
    "Gathered",
    "Item",
    "Prepared",
    "Stage",
    "Staged",
    "Timings",
    "as_request",
    "has_preprocess",
    "has_stages",
    "naming",
    "run_pipeline",
    "run_postprocess",
    "run_predict_postprocess",
    "run_preprocess",
    "run_preprocess_each",
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
R = TypeVar("R")
#: A stage's result and the timings of the stages that made it.
Staged = tuple[T, Timings]
#: What ``preprocess`` made of one request of a call, or that request's error.
Prepared = InferenceRequest | V2MountError
#: One request's answer from a call that answered several, or its error.
Answered = InferenceResponse | V2MountError


#: What a call answers per request: ``preprocess``'s result, a response, or its error.
Item = InferenceRequest | InferenceResponse | V2MountError


class Gathered(NamedTuple):
    """Requests gathered for one call, and whether the call runs their whole chain
    (``run_pipeline``, with at most ``max_rows`` rows a batch) rather than their
    ``preprocess`` alone."""

    requests: Sequence[InferenceRequest]
    whole: bool = False
    max_rows: int = 1


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


def _each(run: Callable[[T], R], items: Sequence[T]) -> list[R | V2MountError]:
    """``run`` on each item apart: an error answers its own item, not its neighbours."""
    results: list[R | V2MountError] = []
    for item in items:
        try:
            results.append(run(item))
        except V2MountError as exc:
            results.append(exc)
    return results


def run_preprocess_each(
    model: Model, call: Call, requests: Sequence[InferenceRequest], timings: Timings
) -> list[Prepared]:
    """``preprocess`` several requests in one call, each apart: an error is its own."""
    return _each(lambda request: run_preprocess(model, call, request, timings), requests)


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


def run_predict_postprocess(
    model: Model,
    call: Call,
    prepared: Sequence[InferenceRequest],
    originals: Sequence[InferenceRequest],
    timings: Timings,
) -> list[Answered]:
    """``predict`` on a batch of preprocessed requests merged, then ``postprocess`` on
    each request's rows (with its original request), all in one call.

    An error in ``predict`` raises (it answers the whole batch, named ``predict``); one
    in a ``postprocess`` answers its request alone.
    """
    # Here, not at the top: v2mount.batching imports the runner, which imports this.
    from v2mount.batching._tensors import batch_rows, merge_requests, split_response

    with naming(model, "predict"):
        if len(prepared) == 1:
            merged = prepared[0]
            responses = [build_response(model, merged, call(model.predict, merged))]
        else:
            merged = merge_requests(prepared)
            response = build_response(model, merged, call(model.predict, merged))
            rows = [batch_rows(request) or 0 for request in prepared]
            responses = split_response(response, prepared, rows)
    del merged
    if not has_postprocess(model):
        return list(responses)
    pairs = list(zip(originals, responses, strict=True))
    return _each(lambda pair: run_postprocess(model, call, *pair, timings), pairs)


def run_pipeline(
    model: Model,
    call: Call,
    requests: Sequence[InferenceRequest],
    max_rows: int,
    timings: Timings,
) -> list[Answered]:
    """preprocess → predict → postprocess for several requests in one call.

    Each request is preprocessed apart; those that succeeded are merged into batches of
    requests that may share a ``predict`` call (at most ``max_rows`` rows; a request
    that cannot be merged goes alone), each batch is predicted once, and each request
    postprocessed apart. An error answers its request, or, in ``predict``, its batch.
    """
    # Here, not at the top: v2mount.batching imports the runner, which imports this.
    from v2mount.batching._tensors import batch_rows, compatibility_key

    answers: list[Answered | None] = [None] * len(requests)
    prepared: list[Prepared] = list(requests)
    if has_preprocess(model):
        prepared = run_preprocess_each(model, call, requests, timings)
    batches: dict[Hashable, list[tuple[int, InferenceRequest, int]]] = {}
    alone = []
    for index, item in enumerate(prepared):
        if isinstance(item, V2MountError):
            answers[index] = item
            continue
        rows = batch_rows(item)
        key = compatibility_key(item) if rows is not None and 0 < rows < max_rows else None
        if key is None:
            alone.append([(index, item, 0)])
        else:
            batches.setdefault(key, []).append((index, item, rows or 0))
    del prepared
    groups = alone
    for members in batches.values():
        group: list[tuple[int, InferenceRequest, int]] = []
        for member in members:
            if group and sum(rows for _, _, rows in group) + member[2] > max_rows:
                groups.append(group)
                group = []
            group.append(member)
        groups.append(group)
    for group in groups:
        indices = [index for index, _, _ in group]
        try:
            results = run_predict_postprocess(
                model, call, [item for _, item, _ in group], [requests[i] for i in indices], timings
            )
        except V2MountError as exc:
            results = [exc] * len(group)
        for index, result in zip(indices, results, strict=True):
            answers[index] = result
    assert all(answer is not None for answer in answers)
    return cast(list[Answered], answers)
