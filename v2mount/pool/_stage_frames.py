"""Stage calls between the pool and a worker (``v2mount.stages``): frames and answers.

Calls, parent to worker (tensors as in any ``_ipc`` frame: large ones in the arena):

- ``PREPROCESS``: several requests in one frame, each preprocessed apart;
- ``PREDICT_POSTPROCESS``: a batch's preprocessed requests, then their original ones, in
  one frame: ``predict`` runs once on the batch merged, then ``postprocess`` on each
  request's rows;
- ``PIPELINE``: several requests in one frame, and the most rows a batch may hold:
  preprocess → predict → postprocess, each request preprocessed and postprocessed apart,
  ``predict`` once per batch of them (``v2mount.stages.run_pipeline``).

The reply is ``ANSWERS``: one item per request of the call, in order — a request (what
``preprocess`` returned), a response, or that request's error — so one request's error
answers it alone. An error of the whole call (a failed batched ``predict``) is an
``ERROR`` frame, as for ``predict``. A reply's meta starts with the stage timings; its
``extra`` holds the custom-metric updates, as a ``RESULT``'s does, so ``updates_of``
reads them from any reply.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from v2mount.errors import V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import MethodRunner
from v2mount.pool._arena import Arena
from v2mount.pool._ipc import (
    ANSWERS,
    ERROR,
    PIPELINE,
    PREDICT_POSTPROCESS,
    PREPROCESS,
    _frame,
    _parse,
    _plain,
    _tensor_from,
    encode_error,
    error_from_wire,
    error_to_wire,
    frame_kind,
)
from v2mount.stages import (
    Gathered,
    Item,
    Timings,
    run_pipeline,
    run_predict_postprocess,
    run_preprocess_each,
)
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput

__all__ = [
    "StageReply",
    "answer_stage",
    "decode_stage_reply",
    "encode_gathered",
    "encode_predict_postprocess",
]

logger = logging.getLogger("v2mount.worker")

#: (sequence number, (one item per request, timings) or the call's error, metric updates).
StageReply = tuple[int, tuple[list[Item], Timings] | V2MountError, list[MetricUpdate]]


def _head(item: Item) -> tuple[list[Any], bool]:
    """An item's meta entry (without its tensors' entries) and whether JSON carries it."""
    if isinstance(item, InferenceRequest):
        parameters = item.parameters
        plain = not parameters or _plain(parameters)
        outputs = None
        if item.outputs is not None:
            outputs = [[out.name, out.parameters] for out in item.outputs]
            plain = plain and all(not p or _plain(p) for _, p in outputs)
        return ["q", item.id, parameters, outputs, len(item.inputs)], plain
    if isinstance(item, InferenceResponse):
        parameters = item.parameters
        plain = not parameters or _plain(parameters)
        head = ["r", item.model_name, item.model_version, item.id, parameters, len(item.outputs)]
        return head, plain
    return ["e", list(error_to_wire(item))], False  # the error's pickle is bytes


def _encode(
    kind: int,
    seq: int,
    items: Sequence[Item],
    arena: Arena | None,
    threshold: int,
    timings: Timings | None = None,
    updates: list[MetricUpdate] | None = None,
    max_rows: int = 0,
    slot: int = 0,
) -> bytes:
    heads = []
    tensors = []
    plain = True
    for item in items:
        head, plain_head = _head(item)
        heads.append(head)
        plain = plain and plain_head
        if isinstance(item, InferenceRequest):
            tensors.extend(item.inputs)
        elif isinstance(item, InferenceResponse):
            tensors.extend(item.outputs)
    extra = pickle.dumps(updates, protocol=5) if updates else b""
    meta = [timings or [], heads, max_rows]
    return _frame(kind, seq, meta, tensors, arena, threshold, plain, extra, slot)


class _Decoded(NamedTuple):
    kind: int
    seq: int
    timings: Timings
    items: list[Item]
    extra: bytes
    max_rows: int


def _decode(frame: bytearray, arena: Arena | None) -> _Decoded:
    kind, seq, meta, extra, data = _parse(frame)
    timings, heads, max_rows, entries = meta
    items: list[Item] = []
    position = 0
    for head in heads:
        if head[0] == "e":
            items.append(error_from_wire(tuple(head[1])))
            continue
        count = head[-1]
        tensors = [
            _tensor_from(entry, frame, data, arena)
            for entry in entries[position : position + count]
        ]
        position += count
        if head[0] == "q":
            request_id, parameters, outputs = head[1:4]
            requested = None if outputs is None else [RequestedOutput(n, p) for n, p in outputs]
            items.append(InferenceRequest(tensors, request_id, parameters, requested))
        else:
            name, version, response_id, parameters = head[1:5]
            items.append(InferenceResponse(name, tensors, version, response_id, parameters))
    timed = [(str(stage), float(seconds)) for stage, seconds in timings]
    return _Decoded(kind, seq, timed, items, extra, max_rows)


def encode_gathered(
    gathered: Gathered, seq: int, arena: Arena | None, threshold: int, slot: int = 0
) -> bytes:
    """Called in the parent: the frame of a ``preprocess`` call on the requests, or of a
    ``PIPELINE`` call when they run their whole chain (to the model of ``slot``)."""
    kind = PIPELINE if gathered.whole else PREPROCESS
    rows = gathered.max_rows
    return _encode(kind, seq, gathered.requests, arena, threshold, max_rows=rows, slot=slot)


def encode_predict_postprocess(
    prepared: Sequence[InferenceRequest],
    originals: Sequence[InferenceRequest],
    seq: int,
    arena: Arena | None,
    threshold: int,
    slot: int = 0,
) -> bytes:
    """Called in the parent: the frame of a batch's ``predict`` and its ``postprocess``
    calls (to the model of ``slot``)."""
    if len(prepared) != len(originals):
        raise ValueError(f"{len(prepared)} preprocessed requests for {len(originals)} requests")
    items = [*prepared, *originals]
    return _encode(PREDICT_POSTPROCESS, seq, items, arena, threshold, slot=slot)


def decode_stage_reply(frame: bytearray, arena: Arena | None) -> StageReply:
    """Called in the parent: the reply to a stage call."""
    kind = frame_kind(frame)
    if kind == ERROR:
        _, seq, meta, _, _ = _parse(frame)
        wire, updates = meta[0], meta[1]
        return seq, error_from_wire(tuple(wire)), updates
    if kind != ANSWERS:
        raise ValueError(f"expected a stage reply frame, got kind {kind}")
    decoded = _decode(frame, arena)
    updates = pickle.loads(decoded.extra) if decoded.extra else []
    return decoded.seq, (decoded.items, decoded.timings), updates


def _requests(items: list[Item]) -> list[InferenceRequest]:
    if not all(isinstance(item, InferenceRequest) for item in items):
        raise ValueError("a stage call frame carries requests only")
    return cast(list[InferenceRequest], items)


def answer_stage(
    runner: MethodRunner, frame: bytearray, arena: Arena | None, threshold: int
) -> bytes:
    """Called in the worker: the reply frame to a stage call frame."""
    model = runner.model
    seq = -1
    timings: Timings = []
    try:
        kind = frame_kind(frame)
        results: list[Item]
        if kind not in (PREPROCESS, PREDICT_POSTPROCESS, PIPELINE):
            raise ValueError(f"not a stage call: frame kind {kind}")
        decoded = _decode(frame, arena)
        seq, requests, max_rows = decoded.seq, _requests(decoded.items), decoded.max_rows
        del decoded
        if kind == PREPROCESS:
            results = [*run_preprocess_each(model, runner.run, requests, timings)]
        elif kind == PIPELINE:
            results = [*run_pipeline(model, runner.run, requests, max_rows, timings)]
        else:
            half = len(requests) // 2
            prepared, originals = requests[:half], requests[half:]
            results = [*run_predict_postprocess(model, runner.run, prepared, originals, timings)]
        del requests
        updates = model.metrics.drain()
        return _encode(ANSWERS, seq, results, arena, threshold, timings, updates)
    except Exception as exc:
        if not isinstance(exc, V2MountError):
            logger.exception("a stage call failed")
        return encode_error(exc, seq, model.metrics.drain())
