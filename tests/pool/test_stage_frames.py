"""Stage calls on the wire (``_stage_frames``): answered in this process, as a worker would."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from v2mount.errors import BadRequest, ModelError
from v2mount.model import MethodRunner, Model
from v2mount.pool._arena import Arena
from v2mount.pool._ipc import (
    ANSWERS,
    ERROR,
    PIPELINE,
    PREDICT_POSTPROCESS,
    PREPROCESS,
    encode_request,
    frame_kind,
    updates_of,
)
from v2mount.pool._stage_frames import (
    answer_stage,
    decode_stage_reply,
    encode_gathered,
    encode_predict_postprocess,
)
from v2mount.stages import Gathered, Item, Timings
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

THRESHOLD = 1024


class Tripler(Model):
    """preprocess: ``x`` → ``wide`` (x twice, times ``scale``); predict: sums and the batch's
    rows; postprocess: the sums times three."""

    def preprocess(self, payload: InferenceRequest) -> Any:
        if payload.parameters.get("refuse"):
            raise BadRequest("refused")
        self.metrics.counter("preprocessed")
        scale = payload.parameters.get("scale", 1)
        return {"wide": scale * np.hstack([payload["x"], payload["x"]])}

    def predict(self, payload: InferenceRequest) -> Any:
        if payload.parameters.get("fail"):
            raise RuntimeError("no batch today")
        wide = payload["wide"]
        return {"sum": wide.sum(axis=1), "batch": np.full(len(wide), len(wide))}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        if payload.parameters.get("explode"):
            raise ZeroDivisionError("division by zero")
        sums = response.output("sum").data
        return {"tripled": sums * 3, "batch": response.output("batch").data}


def request(**parameters: Any) -> InferenceRequest:
    x = np.arange(2000, dtype=np.float64).reshape(2, 1000)  # 16 kB: through the arena
    outputs = [RequestedOutput("tripled")]
    return InferenceRequest([Tensor("x", "FP64", x.shape, x)], "r1", parameters, outputs)


def answered(reply: bytes, arena: Arena, seq: int) -> tuple[list[Item], Timings]:
    got, outcome, _ = decode_stage_reply(bytearray(reply), arena)
    assert got == seq
    assert not isinstance(outcome, Exception), outcome
    return outcome


def test_preprocess_answers_each_request_of_a_call_apart(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    requests = [request(), request(refuse=True), request(scale=2)]
    frame = encode_gathered(Gathered(requests), 7, arena, THRESHOLD)
    assert frame_kind(bytearray(frame)) == PREPROCESS
    reply = answer_stage(runner, bytearray(frame), arena, THRESHOLD)
    assert frame_kind(bytearray(reply)) == ANSWERS
    assert [u.name for u in updates_of(bytearray(reply))] == ["preprocessed"] * 2
    (first, refused, third), timings = answered(reply, arena, 7)
    assert isinstance(first, InferenceRequest) and isinstance(third, InferenceRequest)
    assert (first.id, first.requested_output_names) == ("r1", ["tripled"])
    assert first["wide"].shape == (2, 2000)
    assert np.array_equal(first["wide"][:, 1000:], request()["x"])
    assert np.array_equal(third["wide"], 2 * first["wide"])
    assert type(refused) is BadRequest and str(refused) == "preprocess: refused"
    assert [stage for stage, _ in timings] == ["preprocess"] * 2
    assert all(seconds >= 0 for _, seconds in timings)


def test_a_batch_is_predicted_once_and_postprocessed_per_request(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    originals = [request(), request(explode=True), request(scale=3)]
    prepared = [
        InferenceRequest([Tensor("wide", "FP64", (rows, 2), np.full((rows, 2), value))])
        for rows, value in ((2, 1.0), (1, 5.0), (3, 2.0))
    ]
    frame = encode_predict_postprocess(prepared, originals, 3, arena, THRESHOLD)
    assert frame_kind(bytearray(frame)) == PREDICT_POSTPROCESS
    reply = answer_stage(runner, bytearray(frame), arena, THRESHOLD)
    (first, exploded, third), timings = answered(reply, arena, 3)
    assert isinstance(first, InferenceResponse) and isinstance(third, InferenceResponse)
    # Each request gets its own rows of the batch's sums, tripled.
    assert first.output("tripled").data.tolist() == [6.0, 6.0]
    assert third.output("tripled").data.tolist() == [12.0, 12.0, 12.0]
    assert first.output("batch").data.tolist() == [6, 6]  # predict saw all six rows
    assert first.id == "r1"
    assert type(exploded) is ModelError
    assert str(exploded) == "postprocess failed: ZeroDivisionError: division by zero"
    assert [stage for stage, _ in timings] == ["postprocess"] * 2


def test_a_failing_predict_answers_the_whole_batch(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    originals = [request(), request()]
    wide = np.zeros((1, 2))
    prepared = [
        InferenceRequest([Tensor("wide", "FP64", (1, 2), wide)], None, {"fail": True}),
        InferenceRequest([Tensor("wide", "FP64", (1, 2), wide)], None, {"fail": True}),
    ]
    frame = encode_predict_postprocess(prepared, originals, 5, arena, THRESHOLD)
    reply = answer_stage(runner, bytearray(frame), arena, THRESHOLD)
    assert frame_kind(bytearray(reply)) == ERROR
    seq, outcome, _ = decode_stage_reply(bytearray(reply), arena)
    assert seq == 5 and type(outcome) is ModelError
    assert str(outcome) == "predict failed: RuntimeError: no batch today"


def test_the_pipeline_runs_every_stage_in_one_call(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    frame = encode_gathered(Gathered([request()], whole=True), 4, arena, THRESHOLD)
    assert frame_kind(bytearray(frame)) == PIPELINE
    (answer,), timings = answered(
        answer_stage(runner, bytearray(frame), arena, THRESHOLD), arena, 4
    )
    assert isinstance(answer, InferenceResponse)
    expected = 3 * 2 * request()["x"].sum(axis=1)
    assert answer.output("tripled").data.tolist() == expected.tolist()
    assert [stage for stage, _ in timings] == ["preprocess", "postprocess"]


@pytest.mark.parametrize(
    ("parameters", "error", "text"),
    [
        ({"refuse": True}, BadRequest, "preprocess: refused"),
        ({"explode": True}, ModelError, "postprocess failed: ZeroDivisionError"),
    ],
)
def test_a_pipeline_error_answers_its_request_named(
    arena: Arena, parameters: dict[str, Any], error: type[Exception], text: str
) -> None:
    runner = MethodRunner(Tripler())
    gathered = Gathered([request(**parameters)], whole=True)
    frame = encode_gathered(gathered, 9, arena, THRESHOLD)
    (answer,), _ = answered(answer_stage(runner, bytearray(frame), arena, THRESHOLD), arena, 9)
    assert type(answer) is error
    assert str(answer).startswith(text)


def test_a_frame_of_another_kind_is_refused(arena: Arena) -> None:
    frame = encode_request(request(), 2, arena, THRESHOLD)
    with pytest.raises(ValueError, match="expected a stage reply frame"):
        decode_stage_reply(bytearray(frame), arena)
