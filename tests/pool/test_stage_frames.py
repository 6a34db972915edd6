"""Stage calls on the wire (``_stage_frames``): answered in this process, as a worker would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from v2mount.errors import BadRequest, ModelError
from v2mount.model import MethodRunner, Model
from v2mount.pool._arena import Arena
from v2mount.pool._ipc import (
    PIPELINE,
    PREPROCESS,
    PREPROCESSED,
    STAGED,
    encode_request,
    frame_kind,
    updates_of,
)
from v2mount.pool._stage_frames import answer_stage, decode_stage_reply, encode_postprocess
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

THRESHOLD = 1024


class Tripler(Model):
    """preprocess: ``x`` → ``wide`` (x twice); predict: sum; postprocess: times three."""

    def preprocess(self, payload: InferenceRequest) -> Any:
        if payload.parameters.get("refuse"):
            raise BadRequest("refused")
        self.metrics.counter("preprocessed")
        return {"wide": np.hstack([payload["x"], payload["x"]])}

    def predict(self, payload: InferenceRequest) -> Any:
        return {"sum": payload["wide"].sum(axis=1)}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        if payload.parameters.get("explode"):
            raise ZeroDivisionError("division by zero")
        return {"tripled": response.output("sum").data * 3, "rows": len(payload["x"])}


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    created = Arena.create(str(tmp_path / "arena"))
    assert created is not None
    yield created
    created.close()
    created.unlink()


def request(**parameters: Any) -> InferenceRequest:
    x = np.arange(2000, dtype=np.float64).reshape(2, 1000)  # 16 kB: through the arena
    outputs = [RequestedOutput("tripled")]
    return InferenceRequest([Tensor("x", "FP64", x.shape, x)], "r1", parameters, outputs)


def test_preprocess_comes_back_as_a_request_with_its_timing(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    frame = encode_request(request(), 7, arena, THRESHOLD, PREPROCESS)
    assert frame_kind(bytearray(frame)) == PREPROCESS
    reply = answer_stage(runner, bytearray(frame), arena, THRESHOLD)
    assert frame_kind(bytearray(reply)) == PREPROCESSED
    assert [u.name for u in updates_of(bytearray(reply))] == ["preprocessed"]
    seq, outcome, updates = decode_stage_reply(bytearray(reply), arena)
    assert seq == 7 and [u.name for u in updates] == ["preprocessed"]
    assert not isinstance(outcome, Exception)
    prepared, timings = outcome
    assert isinstance(prepared, InferenceRequest)
    assert (prepared.id, prepared.requested_output_names) == ("r1", ["tripled"])
    assert prepared["wide"].shape == (2, 2000)
    assert np.array_equal(prepared["wide"][:, 1000:], request()["x"])
    assert [stage for stage, _ in timings] == ["preprocess"] and timings[0][1] >= 0


def test_postprocess_gets_the_request_and_its_answer_in_one_frame(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    sums = np.array([10.0, 20.0])
    response = InferenceResponse("tripler", [Tensor("sum", "FP64", (2,), sums)], None, "r1")
    frame = encode_postprocess(request(), response, 3, arena, THRESHOLD)
    reply = answer_stage(runner, bytearray(frame), arena, THRESHOLD)
    assert frame_kind(bytearray(reply)) == STAGED
    seq, outcome, _ = decode_stage_reply(bytearray(reply), arena)
    assert seq == 3 and not isinstance(outcome, Exception)
    answer, timings = outcome
    assert isinstance(answer, InferenceResponse) and answer.id == "r1"
    assert answer.output("tripled").data.tolist() == [30.0, 60.0]
    assert answer.output("rows").data.tolist() == 2
    assert [stage for stage, _ in timings] == ["postprocess"]


def test_the_pipeline_runs_every_stage_in_one_call(arena: Arena) -> None:
    runner = MethodRunner(Tripler())
    frame = encode_request(request(), 4, arena, THRESHOLD, PIPELINE)
    _, outcome, _ = decode_stage_reply(
        bytearray(answer_stage(runner, bytearray(frame), arena, THRESHOLD)), arena
    )
    assert not isinstance(outcome, Exception)
    answer, timings = outcome
    assert isinstance(answer, InferenceResponse)
    expected = 3 * 2 * request()["x"].sum(axis=1)
    assert answer.output("tripled").data.tolist() == expected.tolist()
    assert [stage for stage, _ in timings] == ["preprocess", "postprocess"]


@pytest.mark.parametrize(
    ("kind", "parameters", "error", "text"),
    [
        (PREPROCESS, {"refuse": True}, BadRequest, "preprocess: refused"),
        (PIPELINE, {"refuse": True}, BadRequest, "preprocess: refused"),
        (PIPELINE, {"explode": True}, ModelError, "postprocess failed: ZeroDivisionError"),
    ],
)
def test_a_stage_error_comes_back_named(
    arena: Arena, kind: int, parameters: dict[str, Any], error: type[Exception], text: str
) -> None:
    runner = MethodRunner(Tripler())
    frame = encode_request(request(**parameters), 9, arena, THRESHOLD, kind)
    seq, outcome, _ = decode_stage_reply(
        bytearray(answer_stage(runner, bytearray(frame), arena, THRESHOLD)), arena
    )
    assert seq == 9 and type(outcome) is error
    assert str(outcome).startswith(text)
