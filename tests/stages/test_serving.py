"""Models with preprocess/postprocess stages through a real ``V2App``, in-process and in a
pool, with batching on and off, on asyncio and trio."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import numpy as np
import pytest
from anyio.abc import TaskGroup

from tests import support
from tests.support import Figures, scrape_metrics
from v2mount import InferenceRequest, Model, V2App
from v2mount.codecs.tensor import array_to_datatype as datatype
from v2mount.errors import BadRequest
from v2mount.registry import ModelHandle
from v2mount.types import InferenceResponse, Tensor

pytestmark = pytest.mark.anyio

INFER = "/v2/models/staged/infer"
#: Values of ``x`` that make one stage fail.
FAIL_PRE, FAIL_POST, FAIL_PREDICT, REFUSE_PRE = -1, -2, -3, -4


class Staged(Model):
    """``y = 10 * x + 1``: preprocess scales, predict (batched) adds one, postprocess
    reports where each stage ran and how many rows predict saw at once."""

    name = "staged"
    inputs = [{"name": "x", "datatype": "INT32", "shape": [-1, 1]}]
    outputs = [
        {"name": "y", "datatype": "FP64", "shape": [-1, 1]},
        {"name": "batch", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "pids", "datatype": "INT64", "shape": [-1, 3]},
    ]

    def preprocess(self, payload: InferenceRequest) -> Any:
        x = payload["x"]
        if (x == FAIL_PRE).any():
            raise ValueError("cannot decode this one")
        if (x == REFUSE_PRE).any():
            raise BadRequest("x must not be -4")
        rows = len(x)
        return {"scaled": x.astype(np.float64) * 10, "pre_pid": np.full((rows, 1), os.getpid())}

    def predict(self, payload: InferenceRequest) -> Any:
        scaled = payload["scaled"]
        if (scaled == 10 * FAIL_PREDICT).any():
            raise RuntimeError("predict refused the batch")
        rows = len(scaled)
        self.metrics.histogram("staged_predict_rows", rows, buckets=(1, 2, 4, 8))
        return {
            "z": scaled + 1,
            "batch": np.full((rows, 1), rows),
            "pids": np.hstack([payload["pre_pid"], np.full((rows, 1), os.getpid())]),
        }

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        if (payload["x"] == FAIL_POST).any():
            raise KeyError("no label for this one")
        pids = response.output("pids").data
        post = np.full((len(pids), 1), os.getpid())
        return {
            "y": response.output("z").data,
            "batch": response.output("batch").data,
            "pids": np.hstack([pids, post]),
        }


class AsyncStaged(Staged):
    """The same with ``async`` stages."""

    async def preprocess(self, payload: InferenceRequest) -> Any:
        await anyio.lowlevel.checkpoint()
        return Staged.preprocess(self, payload)

    async def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        await anyio.lowlevel.checkpoint()
        return Staged.postprocess(self, payload, response)


def body(value: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 1], "data": [value]}]}


def outputs(response: httpx.Response) -> dict[str, list[Any]]:
    assert response.status_code == 200, response.text
    return {out["name"]: out["data"] for out in response.json()["outputs"]}


async def send(
    client: httpx.AsyncClient,
    answers: dict[int, httpx.Response],
    value: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Post ``body(value)`` (with the fields of ``extra``) to the staged model; keep the
    answer in ``answers[value]``."""
    answers[value] = await client.post(INFER, json=body(value) | (extra or {}))


async def post_all(client: httpx.AsyncClient, values: list[int]) -> dict[int, httpx.Response]:
    answers: dict[int, httpx.Response] = {}
    async with anyio.create_task_group() as group:
        for value in values:
            group.start_soon(send, client, answers, value)
    return answers


def stage_count(figures: Figures, stage: str) -> float:
    labels = frozenset({"model": "staged", "version": "", "stage": stage}.items())
    return figures.get(("model_infer_stage_duration_seconds_count", labels), 0.0)


#: A full batch of four goes at once; the window is long enough never to close first.
#: With the plain window, every gathered call runs its requests' whole chain.
BATCHED: dict[str, Any] = {"max_batch_size": 4, "max_batch_time": 600}
#: The same through a batcher that holds a batch until it is full (a ``batching`` block):
#: gathered calls below a batch preprocess, and the batcher merges.
HELD: dict[str, Any] = BATCHED | {"batching": {"idle_dispatch": False}}


@pytest.mark.parametrize("model_class", [Staged, AsyncStaged])
@pytest.mark.parametrize("workers", [0, 2])
async def test_predict_sees_merged_batches_of_preprocessed_requests(
    serve: Any, workers: int, model_class: type[Staged]
) -> None:
    app = V2App([model_class(parallel_workers=workers, **HELD)])
    async with serve(app) as client:
        answers = await post_all(client, [1, 2, 3, 4])
        figures = await scrape_metrics(client)
    for value, answer in answers.items():
        got = outputs(answer)
        assert got["y"] == [10.0 * value + 1]
        assert got["batch"] == [4]  # predict saw the four requests merged
        pre, predict, post = got["pids"]
        if workers == 0:
            assert pre == predict == post == os.getpid()
        else:
            assert os.getpid() not in (pre, predict, post)
    assert stage_count(figures, "preprocess") == 4
    assert stage_count(figures, "postprocess") == 4
    labels = frozenset({"model": "staged", "version": "", "stage": "preprocess"}.items())
    assert figures[("model_infer_stage_duration_seconds_sum", labels)] > 0
    assert figures[("staged_predict_rows_sum", frozenset())] == 4


@pytest.mark.parametrize("workers", [0, 2])
async def test_without_batching_the_stages_run_in_one_trip(serve: Any, workers: int) -> None:
    app = V2App([Staged(parallel_workers=workers, max_batch_size=1)])
    async with serve(app) as client:
        answers = await post_all(client, [5, 6, 7])
        figures = await scrape_metrics(client)
    for value, answer in answers.items():
        got = outputs(answer)
        assert got["y"] == [10.0 * value + 1]
        assert got["batch"] == [1]
        pre, predict, post = got["pids"]
        assert pre == predict == post  # one call did all three
        assert (pre == os.getpid()) == (workers == 0)
    assert stage_count(figures, "preprocess") == stage_count(figures, "postprocess") == 3


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_failing_stage_answers_only_its_request(serve: Any, workers: int) -> None:
    # A short window: however the six are gathered and batched, every batch goes.
    app = V2App([Staged(parallel_workers=workers, max_batch_size=4, max_batch_time=0.05)])
    async with serve(app) as client:
        answers = await post_all(client, [FAIL_PRE, 1, REFUSE_PRE, 2, 3, FAIL_POST])
        figures = await scrape_metrics(client)
        health = await client.get("/v2/health/ready")
        again = await post_all(client, [9, 10, 11, 12])
    assert answers[FAIL_PRE].status_code == 500
    assert answers[FAIL_PRE].json() == {
        "error": "preprocess failed: ValueError: cannot decode this one"
    }
    assert answers[REFUSE_PRE].status_code == 400
    assert answers[REFUSE_PRE].json() == {"error": "preprocess: x must not be -4"}
    assert answers[FAIL_POST].status_code == 500
    assert answers[FAIL_POST].json() == {
        "error": "postprocess failed: KeyError: 'no label for this one'"
    }
    assert [outputs(answers[value])["y"] for value in (1, 2, 3)] == [[11], [21], [31]]
    # The preprocess failures never joined a batch: predict saw the four others' rows.
    assert figures[("staged_predict_rows_sum", frozenset())] == 4
    assert stage_count(figures, "preprocess") == 4  # only the ones that succeeded
    assert stage_count(figures, "postprocess") == 3
    assert health.status_code == 200
    assert [outputs(again[value])["y"] for value in (9, 10, 11, 12)] == [[91], [101], [111], [121]]


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_failing_predict_names_its_stage(serve: Any, workers: int) -> None:
    app = V2App([Staged(parallel_workers=workers, max_batch_size=1)])
    async with serve(app) as client:
        answers = await post_all(client, [FAIL_PREDICT, 8])
    assert answers[FAIL_PREDICT].status_code == 500
    assert answers[FAIL_PREDICT].json() == {
        "error": "predict failed: RuntimeError: predict refused the batch"
    }
    assert outputs(answers[8])["y"] == [81.0]


async def test_a_failing_batched_predict_names_its_stage(serve: Any) -> None:
    held = HELD | {"max_batch_size": 2}
    app = V2App([Staged(parallel_workers=0, **held)])
    async with serve(app) as client:
        answers = await post_all(client, [FAIL_PREDICT, 8])
    for value in (FAIL_PREDICT, 8):  # they shared the batch
        assert answers[value].status_code == 500
        assert answers[value].json() == {
            "error": "predict failed: RuntimeError: predict refused the batch"
        }


async def test_stages_refuse_the_ray_backend_at_load(serve: Any) -> None:
    app = V2App([Staged(parallel_workers=1, pool_backend="ray")])
    async with serve(app) as client:
        ready = await client.get("/v2/models/staged/ready")
        answer = await client.post(INFER, json=body(1))
    assert ready.status_code != 200
    assert answer.status_code == 503
    assert "stages are not supported with pool_backend ray" in answer.json()["error"]


class Wide(Model):
    """Large tensors at every hop (above the 64 KiB shared-memory threshold): a
    ``[1, 10000]`` input, a ``[1, 20000]`` preprocessed tensor per request."""

    name = "wide"
    inputs = [{"name": "x", "datatype": "FP64", "shape": [-1, 10000]}]

    def preprocess(self, payload: InferenceRequest) -> Any:
        return {"wide": np.hstack([payload["x"], 2 * payload["x"]])}

    def predict(self, payload: InferenceRequest) -> Any:
        wide = payload["wide"]
        return {"wide": wide, "batch": np.full((len(wide), 1), len(wide))}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        wide = response.output("wide").data
        assert np.array_equal(wide[:, :10000], payload["x"])
        return {"total": wide.sum(axis=1), "batch": response.output("batch").data[:, 0]}


async def test_large_tensors_cross_every_stage_intact(serve: Any) -> None:
    app = V2App([Wide(parallel_workers=2, **HELD)])
    rows = {value: np.arange(10000, dtype=np.float64) * value for value in (1, 2, 3, 4)}
    answers: dict[int, httpx.Response] = {}

    async def post(value: int) -> None:
        data = rows[value].tolist()
        tensor = {"name": "x", "datatype": "FP64", "shape": [1, 10000], "data": data}
        answers[value] = await client.post("/v2/models/wide/infer", json={"inputs": [tensor]})

    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            for value in rows:
                group.start_soon(post, value)
    for value, answer in answers.items():
        got = outputs(answer)
        assert got["total"] == [3 * rows[value].sum()]
        assert got["batch"] == [4]


async def test_the_predictive_batcher_takes_preprocessed_requests(serve: Any) -> None:
    # Fewer requests than a batch: none is gathered into a whole chain of its own.
    model = Staged(parallel_workers=0, max_batch_size=4, batching={"slo_ms": 60_000})
    app = V2App([model])
    async with serve(app) as client:
        answers = await post_all(client, [1, 2, 3])
        figures = await scrape_metrics(client)
    for value, answer in answers.items():
        assert outputs(answer)["y"] == [10.0 * value + 1]
    assert figures[("staged_predict_rows_sum", frozenset())] == 3
    assert stage_count(figures, "preprocess") == stage_count(figures, "postprocess") == 3
    dispatched = sum(
        value for (name, _), value in figures.items() if name == "model_infer_batch_dispatch_total"
    )
    assert dispatched == figures[("staged_predict_rows_count", frozenset())]


class Stuck(Staged):
    """``Staged`` whose preprocess of ``x == 99`` waits until the file named by the
    request parameter ``gate`` exists (a parameter it then drops: the request may share
    a batch with others)."""

    def preprocess(self, payload: InferenceRequest) -> Any:
        gate = payload.parameters.get("gate")
        if gate and (payload["x"] == 99).any():
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.005)
        prepared = Staged.preprocess(self, payload)
        inputs = [
            Tensor(name, datatype(value), value.shape, value) for name, value in prepared.items()
        ]
        return InferenceRequest(inputs, payload.id)


async def test_a_stuck_preprocess_times_out_alone(serve: Any, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    app = V2App([Stuck(parallel_workers=2, inference_timeout=1, **BATCHED)])
    async with serve(app) as client:
        stuck = body(99) | {"parameters": {"gate": str(gate)}}
        timed_out = await client.post(INFER, json=stuck)
        # One worker is still in that preprocess: the other serves the next requests.
        answers = await post_all(client, [1, 2, 3, 4])
        gate.touch()
        again = await post_all(client, [5, 6, 7, 8])
    assert timed_out.status_code == 504
    assert timed_out.json() == {"error": "model staged did not answer within 1 s"}
    assert [outputs(answers[v])["y"] for v in (1, 2, 3, 4)] == [[11], [21], [31], [41]]
    assert [outputs(again[v])["y"] for v in (5, 6, 7, 8)] == [[51], [61], [71], [81]]


#: Polls state that the pool's thread or another task changes.
eventually = partial(support.eventually, seconds=60.0, interval=0.01)


async def hold_then_gather(
    group: TaskGroup,
    client: httpx.AsyncClient,
    handle: ModelHandle,
    gate: Path,
    values: Sequence[int],
    answers: dict[int, httpx.Response],
) -> None:
    """Request 99 takes the model's one worker and holds it in preprocess until ``gate``
    exists; then ``values`` are sent, each from a task of ``group``. Returns once all of
    them wait behind it (gathered)."""
    group.start_soon(send, client, answers, 99, {"parameters": {"gate": str(gate)}})
    await eventually(lambda: handle.in_flight == 1)
    for value in values:
        group.start_soon(send, client, answers, value)
    await eventually(lambda: handle.in_flight == 1 + len(values))


@pytest.mark.parametrize("batching", [None, {"idle_dispatch": False}])
async def test_requests_waiting_for_a_worker_share_one_trip(
    serve: Any, tmp_path: Path, batching: dict[str, Any] | None
) -> None:
    """Under load (the one worker busy) a batch's worth of requests gathers while it
    waits, and runs preprocess, predict and postprocess in one trip."""
    gate = tmp_path / "open"
    model = Stuck(parallel_workers=1, max_batch_size=4, max_batch_time=0.05, batching=batching)
    app = V2App([model])
    handle = app.registry.get("staged")
    answers: dict[int, httpx.Response] = {}
    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            await hold_then_gather(group, client, handle, gate, (1, 2, 3, 4), answers)
            gate.touch()
        figures = await scrape_metrics(client)
        batched = handle.batcher_statistics()
    assert outputs(answers[99])["y"] == [991]
    pids = set()
    for value in (1, 2, 3, 4):
        got = outputs(answers[value])
        assert got["y"] == [10.0 * value + 1]
        assert got["batch"] == [4]
        pre, predict, post_pid = got["pids"]
        assert pre == predict == post_pid  # one call did all three
        pids.add(pre)
    assert len(pids) == 1
    if batching is None:
        assert batched is None  # every call ran its whole chain: no batcher
    else:  # the gathered four went past the batcher: it saw only the first request
        assert batched is not None and batched.batched_requests == 1
    assert stage_count(figures, "preprocess") == stage_count(figures, "postprocess") == 5


@pytest.mark.parametrize("waiting", [1, 3])
async def test_requests_gathered_below_a_batch_are_preprocessed_then_batched(
    serve: Any, tmp_path: Path, waiting: int
) -> None:
    gate = tmp_path / "open"
    app = V2App([Stuck(parallel_workers=1, **HELD)])
    handle = app.registry.get("staged")
    answers: dict[int, httpx.Response] = {}
    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            await hold_then_gather(group, client, handle, gate, range(1, waiting + 1), answers)
            gate.touch()
            # The stuck request and those gathered fill one batch at the batcher.
            for value in range(waiting + 1, 4):
                await eventually(lambda: handle.batcher_statistics().queued_requests >= 1)
                group.start_soon(send, client, answers, value)
        batched = handle.batcher_statistics()
    for value in range(1, 4):
        assert outputs(answers[value])["y"] == [10.0 * value + 1]
    assert outputs(answers[99])["batch"] == [4]
    assert batched is not None and batched.batches == 1


async def test_a_request_that_times_out_waiting_for_a_worker_leaves_its_call(
    serve: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    app = V2App([Stuck(parallel_workers=1, inference_timeout=1, **BATCHED)])
    handle = app.registry.get("staged")
    async with serve(app) as client:
        stuck = body(99) | {"parameters": {"gate": str(gate)}}
        timed_out = await client.post(INFER, json=stuck)
        # The one worker is still in that preprocess: this one waits for it, gathered
        # into a call, and gives up first.
        waited = await client.post(INFER, json=body(5))
        gate.touch()
        await eventually(lambda: handle.runner_statistics().in_flight == 0)
        answers = await post_all(client, [1, 2, 3, 4])
        figures = await scrape_metrics(client)
    assert timed_out.status_code == waited.status_code == 504
    assert waited.json() == {"error": "model staged did not answer within 1 s"}
    assert [outputs(answers[v])["y"] for v in (1, 2, 3, 4)] == [[11], [21], [31], [41]]
    # 5 never ran. 99's call outlives its request (it answers when the gate opens, or
    # its reply is dropped): its timing may or may not have been recorded.
    assert stage_count(figures, "preprocess") in (4, 5)


async def test_with_the_plain_window_a_call_runs_the_whole_chain_of_what_it_gathered(
    serve: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    app = V2App([Stuck(parallel_workers=1, **BATCHED)])
    handle = app.registry.get("staged")
    answers: dict[int, httpx.Response] = {}
    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            await hold_then_gather(group, client, handle, gate, (1, 2), answers)
            gate.touch()
    # 99 alone (a whole chain in one trip, waiting for nobody), then the two gathered
    # while it ran, in one trip of their own.
    assert outputs(answers[99])["batch"] == [1]
    first, second = outputs(answers[1]), outputs(answers[2])
    assert (first["y"], second["y"]) == ([11], [21])
    assert first["batch"] == second["batch"] == [2]
    assert first["pids"] == second["pids"]
    assert len(set(first["pids"])) == 1  # one call did all three


class PostOnly(Model):
    """Only ``postprocess``: it runs in the worker that ran the batch's ``predict``."""

    name = "post"
    inputs = [{"name": "x", "datatype": "INT32", "shape": [-1, 1]}]

    def predict(self, payload: InferenceRequest) -> Any:
        x = payload["x"]
        return {"z": x * 2, "pid": np.full((len(x), 1), os.getpid())}

    def postprocess(self, payload: InferenceRequest, response: InferenceResponse) -> Any:
        if (payload["x"] == FAIL_POST).any():
            raise KeyError("no label for this one")
        pid = response.output("pid").data
        return {
            "y": response.output("z").data + 1,
            "pids": np.hstack([pid, np.full_like(pid, os.getpid())]),
        }


async def test_a_model_with_only_postprocess_postprocesses_where_it_predicted(
    serve: Any,
) -> None:
    app = V2App([PostOnly(parallel_workers=2, **BATCHED)])
    answers: dict[int, httpx.Response] = {}

    async def post(value: int) -> None:
        answers[value] = await client.post("/v2/models/post/infer", json=body(value))

    async with serve(app) as client:
        async with anyio.create_task_group() as group:
            for value in (1, 2, FAIL_POST, 3):
                group.start_soon(post, value)
        figures = await scrape_metrics(client)
    for value in (1, 2, 3):
        got = outputs(answers[value])
        assert got["y"] == [2 * value + 1]
        predicted, postprocessed = got["pids"]
        assert predicted == postprocessed != os.getpid()
    assert answers[FAIL_POST].status_code == 500
    assert answers[FAIL_POST].json() == {
        "error": "postprocess failed: KeyError: 'no label for this one'"
    }
    labels = frozenset({"model": "post", "version": "", "stage": "postprocess"}.items())
    assert figures[("model_infer_stage_duration_seconds_count", labels)] == 3


async def test_an_unused_max_batch_time_is_said_at_load(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="v2mount.registry")
    async with serve(V2App([Staged(parallel_workers=0, **BATCHED)])) as client:
        assert outputs(await client.post(INFER, json=body(2)))["y"] == [21.0]
    warned = [
        r.getMessage() for r in caplog.records if "max_batch_time is unused" in r.getMessage()
    ]
    assert warned == [
        "model staged: max_batch_time is unused: a model with stages gathers the requests "
        "that wait for a busy worker (up to max_batch_size) and runs their whole chain in "
        "one trip; add a batching block to batch by time"
    ]
    caplog.clear()
    windowed = Staged(parallel_workers=0, **BATCHED | {"batching": {}})
    async with serve(V2App([windowed])) as client:
        assert outputs(await client.post(INFER, json=body(2)))["y"] == [21.0]
    assert not [r for r in caplog.records if "max_batch_time is unused" in r.getMessage()]
