"""Adaptive batching, through a real ``InProcessRunner`` and a recording numpy model."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import eventually, infer_all
from v2mount.batching import AdaptiveBatcher, BatcherStatistics
from v2mount.codecs.tensor import array_to_datatype
from v2mount.errors import ModelError, Overloaded
from v2mount.model import Model
from v2mount.runner import InProcessRunner, RunnerStatistics
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

pytestmark = pytest.mark.anyio

LONG = 30.0  # a max_batch_time that is never reached: these batches go when full


class Recorder(Model):
    """Doubles each input (upper-cases BYTES) and records the rows of every call.

    Request parameters steer it: ``fail`` raises, ``aggregate`` returns one row whatever
    the batch; with ``gate`` set, predict waits for it (in its worker thread).
    """

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []  # rows per call; -1 for a 0-d first input
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        first = payload.inputs[0].data
        self.calls.append(-1 if first.ndim == 0 else first.shape[0])
        self.entered.set()
        if self.gate is not None and not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if payload.parameters.get("fail"):
            raise ValueError("boom")
        if payload.parameters.get("aggregate"):
            return {"total": np.atleast_1d(first.sum())}
        outputs: dict[str, Any] = {}
        for tensor in payload.inputs:
            data = tensor.data
            if data.dtype.kind == "O":
                upper = [bytes(item).upper() for item in data.ravel()]
                outputs[f"{tensor.name}_out"] = np.array(upper, dtype=object).reshape(data.shape)
            else:
                outputs[f"{tensor.name}_out"] = data * 2
                if data.ndim >= 1:
                    outputs[f"{tensor.name}_sum"] = data.sum(axis=tuple(range(1, data.ndim)))
        return outputs


def tensor(name: str, data: Any, datatype: str | None = None) -> Tensor:
    array = np.array(data, dtype=object) if datatype == "BYTES" else np.asarray(data)
    return Tensor(name, datatype or array_to_datatype(array), array.shape, array)


def make_request(
    data: Any, id: str | None = None, datatype: str | None = None, **parameters: Any
) -> InferenceRequest:
    return InferenceRequest([tensor("x", data, datatype)], id, parameters)


async def runner_for(model: Model) -> InProcessRunner:
    runner = InProcessRunner(model, max_queue_size=1000, metrics_sink=lambda updates: None)
    await runner.start()
    return runner


def outputs_of(response: object) -> dict[str, Any]:
    assert isinstance(response, InferenceResponse), response
    for out in response.outputs:
        assert out.shape == out.data.shape
    return {out.name: out.data.tolist() for out in response.outputs}


#: Waits for a state of the batcher or model that no event announces (it may last only
#: milliseconds, so it is polled often).
until = partial(eventually, seconds=10.0, interval=0.001)


class Callers:
    """Requests sent from their own tasks, each cancellable on its own."""

    def __init__(self, batcher: AdaptiveBatcher, group: anyio.abc.TaskGroup) -> None:
        self.batcher = batcher
        self.group = group
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.results: dict[str, object] = {}

    def send(self, name: str, rows: int, give_up_after: float | None = None) -> None:
        """Send ``rows`` rows of the value ``rows``, with id ``name``."""
        self.group.start_soon(self._send, name, rows, give_up_after)

    async def _send(self, name: str, rows: int, give_up_after: float | None) -> None:
        with anyio.CancelScope() as scope:
            self.scopes[name] = scope
            try:
                with anyio.fail_after(give_up_after):
                    request = make_request([[rows]] * rows, id=name)
                    self.results[name] = await self.batcher.infer(request)
            except Exception as exc:
                self.results[name] = exc
            except BaseException as exc:  # cancelled: record it and let it unwind
                self.results[name] = exc
                raise


async def test_concurrent_requests_are_merged_into_one_call_and_split_back() -> None:
    model = Recorder()
    sizes: list[int] = []
    batcher = AdaptiveBatcher(
        await runner_for(model), max_batch_size=6, max_batch_time=LONG, on_batch=sizes.append
    )
    requests = [
        make_request([[1.0, 2.0]], id="a"),
        make_request([[3.0, 4.0], [5.0, 6.0]], id="b"),
        make_request([[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]], id="c"),
    ]
    requests[1].outputs = [RequestedOutput("x_sum")]  # the app filters, after the batcher
    a, b, c = await infer_all(batcher, requests)
    assert model.calls == [6]
    assert sizes == [6]
    assert [r.id for r in (a, b, c) if isinstance(r, InferenceResponse)] == ["a", "b", "c"]
    assert outputs_of(a) == {"x_out": [[2.0, 4.0]], "x_sum": [3.0]}
    assert outputs_of(b) == {"x_out": [[6.0, 8.0], [10.0, 12.0]], "x_sum": [7.0, 11.0]}
    assert outputs_of(c)["x_sum"] == [15.0, 19.0, 23.0]
    assert batcher.statistics() == BatcherStatistics(
        queued_requests=0,
        queued_rows=0,
        batches=1,
        in_flight_batches=0,
        batched_requests=3,
        unbatched_requests=0,
        max_batch_size=6,
        max_batch_time=LONG,
    )


async def test_a_request_that_would_overflow_the_batch_sends_it_and_starts_another() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=3, max_batch_time=LONG)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            callers = Callers(batcher, group)
            callers.send("first", 2)
            await until(lambda: batcher.statistics().queued_requests == 1)
            callers.send("second", 2)  # 4 rows > 3: "first" goes alone, "second" waits
            await until(lambda: batcher.statistics().batches == 1)
            callers.send("third", 1)  # fills the second batch
    assert sorted(model.calls) == [2, 3]  # both batches may be in flight at once
    assert outputs_of(callers.results["first"])["x_out"] == [[4], [4]]
    assert outputs_of(callers.results["second"])["x_out"] == [[4], [4]]
    assert outputs_of(callers.results["third"])["x_out"] == [[2]]


async def test_a_lone_request_goes_after_max_batch_time() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=100, max_batch_time=0.01)
    with anyio.fail_after(10):
        response = await batcher.infer(make_request([[1], [2]], id="lone"))
    assert response.id == "lone"
    assert outputs_of(response) == {"x_out": [[2], [4]], "x_sum": [1, 2]}
    assert model.calls == [2]
    assert batcher.statistics().batches == 1


async def test_incompatible_requests_form_separate_batches() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=100, max_batch_time=0.02)
    requests = [
        make_request(np.ones((1, 2), np.float32)),
        make_request(np.ones((2, 2), np.float32), binary_data_output=True),  # encoding only
        make_request(np.ones((1, 2), np.float64)),  # datatype
        make_request(np.ones((1, 3), np.float32)),  # trailing dims
        make_request(np.ones((1, 2), np.float32), mode=1),  # parameters ...
        make_request(np.ones((1, 2), np.float32), mode=True),  # ... of another type
        InferenceRequest([tensor("y", np.ones((1, 2), np.float32))]),  # input names
    ]
    results = await infer_all(batcher, requests)
    assert sorted(model.calls) == [1, 1, 1, 1, 1, 3]
    rows = [len(next(iter(outputs_of(result).values()))) for result in results]
    assert rows == [1, 2, 1, 1, 1, 1, 1]


async def test_requests_without_a_common_first_dimension_run_alone() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=4, max_batch_time=LONG)
    ragged = InferenceRequest([tensor("x", [1, 2]), tensor("y", [1, 2, 3])], id="ragged")
    scalar = InferenceRequest([tensor("x", 5)], id="scalar")
    empty = make_request(np.zeros((0, 2)), id="empty")
    big = make_request([[1]] * 5, id="big")  # more rows than max_batch_size
    ragged_out, scalar_out, empty_out, big_out = await infer_all(
        batcher, [ragged, scalar, empty, big]
    )
    assert outputs_of(ragged_out)["y_sum"] == [1, 2, 3]
    assert outputs_of(scalar_out) == {"x_out": 10}
    assert outputs_of(empty_out)["x_out"] == []
    assert outputs_of(big_out)["x_out"] == [[2]] * 5
    answers = (ragged_out, scalar_out, empty_out, big_out)
    assert [getattr(answer, "id", None) for answer in answers] == [
        "ragged",
        "scalar",
        "empty",
        "big",
    ]
    assert sorted(model.calls) == [-1, 0, 2, 5]
    stats = batcher.statistics()
    assert (stats.unbatched_requests, stats.batches) == (4, 0)


async def test_bytes_inputs_batch() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=3, max_batch_time=LONG)
    requests = [
        make_request([[b"ab", b"c"]], datatype="BYTES"),
        make_request([[b"de", b""], [b"f", b"gh"]], datatype="BYTES"),
    ]
    first, second = await infer_all(batcher, requests)
    assert model.calls == [3]
    assert outputs_of(first) == {"x_out": [[b"AB", b"C"]]}
    assert outputs_of(second) == {"x_out": [[b"DE", b""], [b"F", b"GH"]]}
    assert isinstance(first, InferenceResponse)
    assert first.output("x_out").datatype == "BYTES"


async def test_an_error_in_predict_answers_its_whole_batch_and_only_it() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=100, max_batch_time=0.02)
    requests = [
        make_request([[1]], fail=True),
        make_request([[2]]),
        make_request([[3]], fail=True),
        make_request([[4]]),
    ]
    failed_a, ok_a, failed_b, ok_b = await infer_all(batcher, requests)
    assert sorted(model.calls) == [2, 2]
    for failed in (failed_a, failed_b):
        assert isinstance(failed, ModelError)
        assert failed.message == "ValueError: boom"
        assert failed.status_code == 500
    assert failed_a is not failed_b  # one exception object per caller
    assert outputs_of(ok_a)["x_out"] == [[4]]
    assert outputs_of(ok_b)["x_out"] == [[8]]


async def test_an_output_without_one_row_per_input_row_fails_the_batch_clearly() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=3, max_batch_time=LONG)
    requests = [make_request([[1], [2]], aggregate=True), make_request([[3]], aggregate=True)]
    results = await infer_all(batcher, requests)
    assert model.calls == [3]
    for result in results:
        assert isinstance(result, ModelError)
        assert result.message == (
            "adaptive batching: output 'total' has shape [1] but the batch has 3 rows; "
            "with batching on, every output must have one row per input row"
        )


async def test_a_request_cancelled_before_its_batch_goes_leaves_it() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=3, max_batch_time=LONG)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            callers = Callers(batcher, group)
            callers.send("doomed", 1)
            callers.send("kept", 1)
            await until(lambda: batcher.statistics().queued_requests == 2)
            callers.scopes["doomed"].cancel()
            await until(lambda: batcher.statistics().queued_requests == 1)
            callers.send("late", 2)  # fills the batch: kept + late = 3 rows
    assert model.calls == [3]
    assert isinstance(callers.results["doomed"], anyio.get_cancelled_exc_class())
    assert outputs_of(callers.results["kept"])["x_out"] == [[2]]
    assert outputs_of(callers.results["late"])["x_out"] == [[4], [4]]
    assert batcher.statistics().batched_requests == 2


async def test_a_request_cancelled_while_its_batch_runs_returns_at_once() -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=2, max_batch_time=LONG)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            callers = Callers(batcher, group)
            callers.send("doomed", 1, give_up_after=0.05)  # as inference_timeout does
            callers.send("kept", 1)
            await until(model.entered.is_set)
            # The doomed caller must return while predict is still held at the gate.
            await until(lambda: "doomed" in callers.results)
            model.gate.set()
    assert model.calls == [2]
    assert isinstance(callers.results["doomed"], TimeoutError)
    assert outputs_of(callers.results["kept"]) == {"x_out": [[2]], "x_sum": [1]}
    assert batcher.statistics().in_flight_batches == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_successive_requests_may_come_from_different_event_loops(backend: str) -> None:
    model = Recorder()
    runner = InProcessRunner(model, max_queue_size=10, metrics_sink=lambda updates: None)
    # Each full batch leaves its deadline task asleep when its loop closes: that is fine.
    batcher = AdaptiveBatcher(runner, max_batch_size=2, max_batch_time=LONG)
    anyio.run(runner.start, backend=backend)
    for value in range(3):
        pair = [make_request([[value]], id="a"), make_request([[value]], id="b")]
        answers = anyio.run(infer_all, batcher, pair, backend=backend)
        assert [outputs_of(answer)["x_out"] for answer in answers] == [[[2 * value]]] * 2
    assert model.calls == [2, 2, 2]
    assert batcher.statistics().batches == 3


def test_settings_are_checked() -> None:
    runner = InProcessRunner(Recorder(), max_queue_size=10, metrics_sink=lambda updates: None)
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, not 0"):
        AdaptiveBatcher(runner, max_batch_size=0, max_batch_time=0.1)
    with pytest.raises(ValueError, match="max_batch_time must not be negative, not -1"):
        AdaptiveBatcher(runner, max_batch_size=2, max_batch_time=-1)


# Request kinds for the property test: (datatype, trailing shape, parameters).
KINDS = [
    ("FP32", (2,), {}),
    ("FP32", (2,), {"mode": "a"}),
    ("INT64", (3,), {}),
    ("BYTES", (1,), {}),
]


def kind_request(index: int, kind: int, rows: int) -> InferenceRequest:
    datatype, trailing, parameters = KINDS[kind]
    values = np.arange(rows * int(np.prod(trailing))).reshape(rows, *trailing) + 10 * index
    if datatype == "BYTES":
        data: Any = np.vectorize(lambda v: str(v).encode(), otypes=[object])(values)
    else:
        data = values.astype(np.float32 if datatype == "FP32" else np.int64)
    return InferenceRequest([Tensor("x", datatype, data.shape, data)], f"r{index}", parameters)


@settings(max_examples=15, deadline=None)
@given(
    mix=st.lists(
        st.tuples(st.integers(0, len(KINDS) - 1), st.integers(0, 4)), min_size=1, max_size=10
    ),
    max_batch_size=st.integers(1, 6),
)
async def test_batched_answers_equal_unbatched_answers(
    mix: list[tuple[int, int]], max_batch_size: int
) -> None:
    runner = await runner_for(Recorder())
    batcher = AdaptiveBatcher(runner, max_batch_size=max_batch_size, max_batch_time=0.002)
    requests = [kind_request(i, kind, rows) for i, (kind, rows) in enumerate(mix)]
    batched = await infer_all(batcher, requests)
    for request, answer in zip(requests, batched, strict=True):
        expected = await runner.infer(request)
        assert isinstance(answer, InferenceResponse), answer
        assert answer.id == request.id
        assert [(o.name, o.datatype, o.shape) for o in answer.outputs] == [
            (o.name, o.datatype, o.shape) for o in expected.outputs
        ]
        for got, want in zip(answer.outputs, expected.outputs, strict=True):
            assert got.data.dtype == want.data.dtype
            np.testing.assert_array_equal(got.data, want.data)
    assert batcher.statistics().queued_requests == 0


class FailingRunner:
    """A runner whose every call raises ``error``."""

    ready = True
    reason = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def start(self) -> None:
        pass

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        raise self.error

    async def stop(self) -> None:
        pass

    def statistics(self) -> RunnerStatistics:
        return RunnerStatistics(0, 0, 0, 0, 1)


async def test_a_plain_exception_from_the_runner_becomes_a_model_error() -> None:
    runner = FailingRunner(RuntimeError("lost the plot"))  # breaks the Runner contract
    batcher = AdaptiveBatcher(runner, max_batch_size=2, max_batch_time=LONG)
    results = await infer_all(batcher, [make_request([[1]]), make_request([[2]])])
    for result in results:
        assert isinstance(result, ModelError)
        assert result.message == "RuntimeError: lost the plot"
    assert batcher.statistics().in_flight_batches == 0


async def test_every_caller_gets_its_own_copy_of_the_runners_error() -> None:
    runner = FailingRunner(Overloaded("model 'm' has 9 requests queued", retry_after=3))
    batcher = AdaptiveBatcher(runner, max_batch_size=2, max_batch_time=LONG)
    first, second = await infer_all(batcher, [make_request([[1]]), make_request([[2]])])
    for result in (first, second):
        assert isinstance(result, Overloaded)
        assert result.message == "model 'm' has 9 requests queued"
        assert result.headers() == {"Retry-After": "3"}
    assert first is not second


async def test_many_requests_some_cancelled_all_others_answered_right() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(await runner_for(model), max_batch_size=8, max_batch_time=0.001)
    rng = np.random.default_rng(4)
    answered: dict[int, object] = {}

    async def one(index: int, rows: int, cancel_after: int) -> None:
        request = make_request(np.full((rows, 2), index), id=str(index))
        with anyio.CancelScope() as scope:
            if cancel_after >= 0:
                # Cancel from a sibling after a few loop turns: before or after dispatch.
                async def canceller() -> None:
                    for _ in range(cancel_after):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                group.start_soon(canceller)
            answered[index] = await batcher.infer(request)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for index in range(300):
                rows = int(rng.integers(1, 5))
                cancel_after = int(rng.integers(0, 6)) if rng.random() < 0.3 else -1
                group.start_soon(one, index, rows, cancel_after)
                if index % 7 == 0:
                    await anyio.lowlevel.checkpoint()
    for index, response in answered.items():
        out = outputs_of(response)["x_out"]
        assert np.array_equal(out, np.full((len(out), 2), 2 * index))
        assert getattr(response, "id", None) == str(index)
    stats = batcher.statistics()
    assert 100 < len(answered) < 300
    assert (stats.queued_requests, stats.queued_rows, stats.in_flight_batches) == (0, 0, 0)
    assert stats.batched_requests >= len(answered)
