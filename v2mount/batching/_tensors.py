"""What may share a model call, and merging requests / splitting the answer by rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from v2mount.errors import ModelError, V2MountError
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

if TYPE_CHECKING:
    from v2mount.runner import Runner

#: Answers a batch's requests, one response or error each, in order; an exception
#: answers them all. Replaces merge → ``Runner.infer`` → split (a model with stages:
#: ``predict`` and each request's ``postprocess`` in one call).
BatchAnswer = Callable[
    [list[InferenceRequest]], Awaitable[Sequence[InferenceResponse | V2MountError]]
]

#: Parameters that only say how tensors travel on the wire; they never split batches.
ENCODING_KEYS = frozenset({"binary_data_output", "binary_data_size"})


def batch_rows(request: InferenceRequest) -> int | None:
    """The request's row count (``shape[0]`` of every input), or ``None`` if it has none."""
    rows = None
    for tensor in request.inputs:
        if tensor.data.ndim == 0 or rows not in (None, tensor.data.shape[0]):
            return None
        rows = tensor.data.shape[0]
    return rows


def compatibility_key(request: InferenceRequest) -> Hashable | None:
    """What must be equal for two requests to share a model call (``None``: unhashable)."""
    try:
        key = (
            tuple(
                (t.name, t.datatype, t.data.dtype.str, t.data.shape[1:], _freeze(t.parameters))
                for t in request.inputs
            ),
            _freeze(request.parameters),
        )
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a parameter value; the type is kept so ``1 != True``."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items() if k not in ENCODING_KEYS))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v) for v in value))
    return (type(value).__name__, value)


def merge_requests(requests: Sequence[InferenceRequest]) -> InferenceRequest:
    """One request holding every request's rows, in order, asking for all outputs.

    The requests share a compatibility key, so their inputs line up one to one.
    """
    first = requests[0]
    inputs = []
    for index, tensor in enumerate(first.inputs):
        data = np.concatenate([request.inputs[index].data for request in requests], axis=0)
        inputs.append(
            Tensor(tensor.name, tensor.datatype, data.shape, data, dict(tensor.parameters))
        )
    parameters = {k: v for k, v in first.parameters.items() if k not in ENCODING_KEYS}
    return InferenceRequest(inputs, None, parameters, None)


def split_response(
    response: InferenceResponse, requests: Sequence[InferenceRequest], rows: Sequence[int]
) -> list[InferenceResponse]:
    """Cut every output back into each request's rows (views, no copies).

    Raises ``ModelError`` when an output does not have one row per input row: splitting
    it would hand requests each other's answers.
    """
    total = sum(rows)
    for tensor in response.outputs:
        if tensor.data.ndim == 0 or tensor.data.shape[0] != total:
            raise ModelError(
                f"adaptive batching: output {tensor.name!r} has shape {list(tensor.data.shape)}"
                f" but the batch has {total} rows; with batching on, every output must have"
                f" one row per input row"
            )
    parts = []
    start = 0
    for request, count in zip(requests, rows, strict=True):
        stop = start + count
        outputs = [
            Tensor(
                t.name,
                t.datatype,
                (count, *t.data.shape[1:]),
                t.data[start:stop],
                dict(t.parameters),
            )
            for t in response.outputs
        ]
        parts.append(
            InferenceResponse(
                response.model_name,
                outputs,
                response.model_version,
                request.id,
                dict(response.parameters),
            )
        )
        start = stop
    return parts


async def answer_alone(
    runner: Runner, answer: BatchAnswer | None, request: InferenceRequest
) -> InferenceResponse:
    """A request that is not batched: the runner's ``infer``, or ``answer`` on it alone."""
    if answer is None:
        return await runner.infer(request)
    (outcome,) = await answer([request])
    if isinstance(outcome, V2MountError):
        raise outcome
    return outcome


async def answer_batch(
    runner: Runner,
    answer: BatchAnswer | None,
    requests: list[InferenceRequest],
    rows: Sequence[int],
) -> Sequence[InferenceResponse | V2MountError]:
    """A batch's answers, one per request: ``answer``'s, or the runner's on the requests
    merged, split by rows."""
    if answer is not None:
        outcomes = await answer(requests)
        if len(outcomes) != len(requests):
            raise ModelError(f"{len(outcomes)} answers for a batch of {len(requests)} requests")
        return outcomes
    merged = requests[0] if len(requests) == 1 else merge_requests(requests)
    return split_response(await runner.infer(merged), requests, rows)


def split_outcome(
    outcome: InferenceResponse | V2MountError,
) -> tuple[V2MountError | None, InferenceResponse | None]:
    """(error, response): one of them is ``None``."""
    if isinstance(outcome, V2MountError):
        return outcome, None
    return None, outcome
