"""Stage calls between the pool and a worker (``v2mount.stages``): frames and answers.

Calls, parent to worker (tensors as in any ``_ipc`` frame: large ones in the arena):

- ``PREPROCESS``: a request frame; the reply is ``PREPROCESSED``, a request-shaped frame
  holding what ``preprocess`` returned.
- ``PIPELINE``: a request frame; preprocess → predict → postprocess run in the worker,
  in one trip (batching off), and the reply is ``STAGED``, a response frame.
- ``POSTPROCESS``: the client's request and its rows of ``predict``'s answer in one frame
  (the request's inputs, then the response's outputs); the reply is ``STAGED``.

A reply's meta starts with the stage timings; its ``extra`` holds the custom-metric
updates, as a ``RESULT``'s does, so ``updates_of`` reads them from any reply. An error is
an ``ERROR`` frame, as for ``predict``.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from v2mount.errors import V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import MethodRunner
from v2mount.pool._arena import Arena
from v2mount.pool._ipc import (
    ERROR,
    PIPELINE,
    POSTPROCESS,
    PREPROCESS,
    PREPROCESSED,
    STAGED,
    _frame,
    _parse,
    _plain,
    _tensor_from,
    decode_request,
    encode_error,
    error_from_wire,
    frame_kind,
)
from v2mount.stages import Timings, run_pipeline, run_postprocess, run_preprocess
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput

__all__ = [
    "StageReply",
    "answer_stage",
    "decode_stage_reply",
    "encode_postprocess",
]

logger = logging.getLogger("v2mount.worker")

#: (sequence number, (result, timings) or the error, custom-metric updates).
StageReply = tuple[
    int, tuple[InferenceRequest | InferenceResponse, Timings] | V2MountError, list[MetricUpdate]
]


def _request_head(request: InferenceRequest) -> tuple[list[Any], bool]:
    parameters = request.parameters
    plain = not parameters or _plain(parameters)
    outputs = None
    if request.outputs is not None:
        outputs = [[out.name, out.parameters] for out in request.outputs]
        plain = plain and all(not p or _plain(p) for _, p in outputs)
    return [request.id, parameters, outputs], plain


def _response_head(response: InferenceResponse) -> tuple[list[Any], bool]:
    parameters = response.parameters
    plain = not parameters or _plain(parameters)
    return [response.model_name, response.model_version, response.id, parameters], plain


def _request_of(head: list[Any], inputs: list[Any]) -> InferenceRequest:
    request_id, parameters, outputs = head
    requested = None if outputs is None else [RequestedOutput(n, p) for n, p in outputs]
    return InferenceRequest(inputs, request_id, parameters, requested)


def encode_postprocess(
    request: InferenceRequest,
    response: InferenceResponse,
    seq: int,
    arena: Arena | None,
    threshold: int,
    slot: int = 0,
) -> bytes:
    """Called in the parent: the frame of a ``postprocess`` call (to the model of ``slot``)."""
    request_head, plain_request = _request_head(request)
    response_head, plain_response = _response_head(response)
    head = [*request_head, len(request.inputs), *response_head]
    tensors = [*request.inputs, *response.outputs]
    plain = plain_request and plain_response
    return _frame(POSTPROCESS, seq, head, tensors, arena, threshold, plain, slot=slot)


def _decode_postprocess(
    frame: bytearray, arena: Arena | None
) -> tuple[int, InferenceRequest, InferenceResponse]:
    _, seq, meta, _, data = _parse(frame)
    *head, entries = meta
    tensors = [_tensor_from(entry, frame, data, arena) for entry in entries]
    count = head[3]
    request = _request_of(head[:3], tensors[:count])
    name, version, response_id, parameters = head[4:]
    return seq, request, InferenceResponse(name, tensors[count:], version, response_id, parameters)


def _encode_reply(
    result: InferenceRequest | InferenceResponse,
    timings: Timings,
    seq: int,
    updates: list[MetricUpdate],
    arena: Arena | None,
    threshold: int,
) -> bytes:
    if isinstance(result, InferenceRequest):
        kind, (head, plain), tensors = PREPROCESSED, _request_head(result), result.inputs
    else:
        kind, (head, plain), tensors = STAGED, _response_head(result), result.outputs
    extra = pickle.dumps(updates, protocol=5) if updates else b""
    return _frame(kind, seq, [timings, *head], tensors, arena, threshold, plain, extra)


def decode_stage_reply(frame: bytearray, arena: Arena | None) -> StageReply:
    """Called in the parent: the reply to a stage call."""
    kind, seq, meta, extra, data = _parse(frame)
    if kind == ERROR:
        wire, updates = meta[0], meta[1]
        return seq, error_from_wire(tuple(wire)), updates
    updates = pickle.loads(extra) if extra else []
    timings, *head, entries = meta
    tensors = [_tensor_from(entry, frame, data, arena) for entry in entries]
    timed = [(str(stage), float(seconds)) for stage, seconds in timings]
    if kind == PREPROCESSED:
        return seq, (_request_of(head, tensors), timed), updates
    if kind == STAGED:
        name, version, response_id, parameters = head
        return (
            seq,
            (InferenceResponse(name, tensors, version, response_id, parameters), timed),
            updates,
        )
    raise ValueError(f"expected a stage reply frame, got kind {kind}")


def answer_stage(
    runner: MethodRunner, frame: bytearray, arena: Arena | None, threshold: int
) -> bytes:
    """Called in the worker: the reply frame to a stage call frame."""
    model = runner.model
    seq = -1
    timings: Timings = []
    try:
        kind = frame_kind(frame)
        result: InferenceRequest | InferenceResponse
        if kind == POSTPROCESS:
            seq, request, response = _decode_postprocess(frame, arena)
            result = run_postprocess(model, runner.run, request, response, timings)
            del response
        elif kind == PREPROCESS:
            seq, request = decode_request(frame, arena)
            result = run_preprocess(model, runner.run, request, timings)
        elif kind == PIPELINE:
            seq, request = decode_request(frame, arena)
            result = run_pipeline(model, runner.run, request, timings)
        else:
            raise ValueError(f"not a stage call: frame kind {kind}")
        del request
        return _encode_reply(result, timings, seq, model.metrics.drain(), arena, threshold)
    except Exception as exc:
        if not isinstance(exc, V2MountError):
            logger.exception("a stage call failed")
        return encode_error(exc, seq, model.metrics.drain())
