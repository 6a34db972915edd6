"""WorkerPool with real worker processes, on asyncio and trio.

Pools are expensive to start (a spawned interpreter per worker), so most tests share
module-scoped pools. Those are started and stopped with ``anyio.run`` on loops of their
own, so every test also shows that a pool serves callers on other event loops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import multiprocess
import numpy as np
import pytest

from tests import support
from tests.support import alive, ignore, load_module
from v2mount.errors import (
    BadRequest,
    BrokenWorker,
    InferenceTimeout,
    ModelError,
    ModelNotReady,
    Overloaded,
)
from v2mount.metrics.custom import MetricUpdate
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.pool._arena import SHM_DIR
from v2mount.pool._worker import THREAD_VARIABLES
from v2mount.types import InferenceRequest, Tensor

pytestmark = pytest.mark.anyio

#: The parent's thread settings before any pool started: workers must not change them.
PARENT_THREAD_ENV = {name: os.environ.get(name) for name in THREAD_VARIABLES}


#: Loaded by path: workers must cope with modules they cannot import.
models = load_module(Path(__file__).with_name("pool_models.py"), "v2mount_test_pool_models")
AsyncDouble, DiesInLoad, Echo, FailsToLoad, Sleepy = (
    models.AsyncDouble,
    models.DiesInLoad,
    models.Echo,
    models.FailsToLoad,
    models.Sleepy,
)


def request(request_id: str = "r", **params: Any) -> InferenceRequest:
    """A request whose inputs are the numpy arrays in ``params`` (the rest are parameters)."""
    arrays = {k: v for k, v in params.items() if isinstance(v, np.ndarray)}
    parameters = {k: v for k, v in params.items() if k not in arrays}
    tensors = [Tensor(name, "FP32", a.shape, a) for name, a in arrays.items()]
    return InferenceRequest(
        tensors or [Tensor("x", "FP32", (1,), np.zeros(1, np.float32))],
        id=request_id,
        parameters=parameters,
    )


def our_arenas(model: str = "", pid: int | None = None) -> set[str]:
    """The shared-memory arenas that pools of process ``pid`` (this one by default) hold,
    for the model ``model`` (all models by default)."""
    prefix = f"v2mount-{pid or os.getpid()}-{model}"
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


def mapped_arenas(pid: int | str = "self", model: str = "") -> list[int]:
    """Sizes of the arenas process ``pid`` maps (their names are gone once both ends hold
    them open, but the mappings show in ``/proc``)."""
    prefix = f"{SHM_DIR}/v2mount-"
    sizes = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix) and f"-{model}" in fields[5]:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                sizes.append(end - start)
    return sizes


#: Polls state that another thread (the pool's monitor) changes.
eventually = partial(support.eventually, seconds=30.0)


def started(pool: WorkerPool) -> Iterator[WorkerPool]:
    anyio.run(pool.start)
    try:
        yield pool
    finally:
        anyio.run(pool.stop)


@pytest.fixture(scope="module")
def sink() -> list[MetricUpdate]:
    return []


@pytest.fixture(scope="module")
def echo(sink: list[MetricUpdate]) -> Iterator[WorkerPool]:
    yield from started(WorkerPool(Echo(), PoolConfig(2, 64), metrics_sink=sink.extend))


@pytest.fixture(scope="module")
def sleepy() -> Iterator[WorkerPool]:
    pool = WorkerPool(Sleepy(), PoolConfig(1, 1, hard_timeout=1.5), metrics_sink=ignore)
    yield from started(pool)


@pytest.fixture(scope="module")
def crashy() -> Iterator[WorkerPool]:
    yield from started(WorkerPool(Echo(), PoolConfig(2, 64), metrics_sink=ignore))


def seconds(value: float) -> InferenceRequest:
    return InferenceRequest([Tensor("seconds", "FP64", (1,), np.array([value]))], id="s")


# -- results ---------------------------------------------------------------------------


async def test_numeric_and_bytes_tensors_round_trip(echo: WorkerPool) -> None:
    tensors = [
        Tensor("f", "FP32", (2, 2), np.arange(4, dtype=np.float32).reshape(2, 2)),
        Tensor("i", "INT64", (3,), np.array([1, -2, 3], np.int64)),
        Tensor("b", "BOOL", (2,), np.array([True, False])),
        Tensor("s", "BYTES", (2,), np.array([b"caf\xc3\xa9", b""], dtype=object)),
    ]
    response = await echo.infer(InferenceRequest(tensors, id="abc", parameters={"k": 1}))
    assert response.model_name == "echo" and response.id == "abc"
    by_name = {t.name: t for t in response.outputs}
    for tensor in tensors:
        out = by_name[tensor.name]
        assert out.datatype == tensor.datatype and out.shape == tensor.shape
        assert out.data.tolist() == tensor.data.tolist()


async def test_four_megabytes_cross_by_shared_memory(echo: WorkerPool) -> None:
    array = np.random.default_rng(0).random(1 << 20, dtype=np.float32)
    response = await echo.infer(request(x=array))
    out = response.outputs[0].data
    assert out.dtype == np.float32 and np.array_equal(out, array)
    assert out.flags.writeable and not np.shares_memory(out, array)
    assert max(mapped_arenas(model="echo-")) >= array.nbytes  # this end maps the arena
    assert not our_arenas("echo-")  # and nobody could leak it: it has no name any more


async def test_model_errors_keep_class_and_message(echo: WorkerPool) -> None:
    with pytest.raises(ModelError) as info:
        await echo.infer(request(action="raise"))
    assert info.value.message == "ValueError: bad input, refused"
    assert "Traceback" not in info.value.message
    with pytest.raises(BadRequest) as bad:
        await echo.infer(request(action="bad_request"))
    assert type(bad.value) is BadRequest and bad.value.message == "you asked for it"


async def test_custom_metrics_reach_the_sink(echo: WorkerPool, sink: list[MetricUpdate]) -> None:
    await echo.infer(request())
    await eventually(lambda: any(u.name == "echo_calls" for u in sink))
    assert [u.name for u in sink].count("echo_loads") == 2  # one per worker
    call = next(u for u in sink if u.name == "echo_calls")
    assert call.kind == "counter" and call.labels == (("model", "echo"),) and call.value == 1.0


async def test_worker_logs_and_output_reach_the_parent(
    echo: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount.worker")
    await echo.infer(request("log-me", action="log"))
    await eventually(lambda: any("to stderr" in r.getMessage() for r in caplog.records))
    records = [r for r in caplog.records if r.name == "v2mount.worker"]
    logged = next(r for r in records if "predict saw log-me" in r.getMessage())
    assert logged.levelno == logging.WARNING and "pool_models" in logged.getMessage()
    assert logged.model_name == "echo" and isinstance(logged.worker_id, int)  # type: ignore[attr-defined]
    printed = next(r for r in records if "to stderr" in r.getMessage())
    assert "[model echo, worker" in printed.getMessage() and printed.levelno == logging.WARNING


async def test_native_threads_are_limited_in_the_worker_only(echo: WorkerPool) -> None:
    response = await echo.infer(request(action="env"))
    assert response.output("env").data.tolist() == [b"1", b"1", b"1"]
    assert set(response.output("pools").data.tolist()) == {1}  # numpy's BLAS, already loaded
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == PARENT_THREAD_ENV


async def test_async_model_keeps_one_loop_and_stop_leaves_nothing() -> None:
    model = AsyncDouble()
    assert model.settings.inputs == []
    pool = WorkerPool(model, PoolConfig(1, 4), metrics_sink=ignore)
    declared = await pool.start()
    pids = pool.pids()
    assert pool.ready and pool.reason is None and len(pids) == 1
    # What load declared in the worker comes back to the caller, to serve as metadata;
    # the parent's model settings are left as they were.
    assert declared is not None and declared.outputs == []
    assert [(s.name, s.datatype, s.shape) for s in declared.inputs] == [("x", "FP32", [-1])]
    assert model.settings.inputs == []
    for _ in range(2):
        response = await pool.infer(request(x=np.array([1.5, -2.0], np.float32)))
    assert response.outputs[0].data.tolist() == [3.0, -4.0]
    assert response.outputs[1].data.tolist() == [1]  # both calls ran on the same loop

    await pool.stop()
    await pool.stop()
    assert not any(alive(pid) for pid in pids)
    assert not any(child.pid in pids for child in multiprocess.active_children())
    assert not our_arenas("async-double-") and not mapped_arenas(model="async-double-")
    assert not pool.ready and pool.pids() == []
    with pytest.raises(ModelNotReady, match="stopped"):
        await pool.infer(request())


# -- concurrency, queueing, cancellation ----------------------------------------------


async def test_a_sleeping_model_does_not_hold_up_another(
    echo: WorkerPool, sleepy: WorkerPool
) -> None:
    finished: list[str] = []

    async def slow() -> None:
        await sleepy.infer(seconds(0.5))
        finished.append("sleepy")

    async with anyio.create_task_group() as group:
        group.start_soon(slow)
        await eventually(lambda: sleepy.statistics().in_flight == 1)
        await echo.infer(request())
        finished.append("echo")
    assert finished == ["echo", "sleepy"]


async def test_full_queue_answers_overloaded(sleepy: WorkerPool) -> None:
    async with anyio.create_task_group() as group:
        group.start_soon(sleepy.infer, seconds(0.5))
        await eventually(lambda: sleepy.statistics().in_flight == 1)
        group.start_soon(sleepy.infer, seconds(0.0))
        await eventually(lambda: sleepy.statistics().queued == 1)
        with pytest.raises(Overloaded) as info:
            await sleepy.infer(seconds(0.0))
    assert info.value.status_code == 503 and info.value.headers() == {"Retry-After": "1"}
    assert sleepy.statistics().in_flight == 0


async def test_cancelled_requests_leave_nothing_behind(echo: WorkerPool) -> None:
    # Running: the worker finishes it, and its late result reaches nobody.
    with anyio.move_on_after(0.3) as scope:
        await echo.infer(request("late", x=np.array([9.0], np.float32), action="sleep", seconds=1))
    assert scope.cancelled_caught
    for i in range(3):
        response = await echo.infer(request(f"r{i}", x=np.array([i], np.float32)))
        assert response.id == f"r{i}" and response.outputs[0].data.tolist() == [i]

    # Queued: withdrawn at once.
    async with anyio.create_task_group() as group:
        await eventually(lambda: echo.statistics().in_flight <= 1)
        for _ in range(2 - echo.statistics().in_flight):
            group.start_soon(echo.infer, request(action="sleep", seconds=0.5))
        await eventually(lambda: echo.statistics().in_flight == 2)
        with anyio.move_on_after(0.1) as scope:
            await echo.infer(request())
        assert scope.cancelled_caught
        assert echo.statistics().queued == 0
    await eventually(lambda: echo.statistics().in_flight == 0)
    assert (await echo.infer(request("after", x=np.ones(1, np.float32)))).id == "after"


def test_successive_calls_from_different_event_loops(echo: WorkerPool) -> None:
    for backend in ("asyncio", "trio", "asyncio"):
        response = anyio.run(
            echo.infer, request(backend, x=np.ones(2, np.float32)), backend=backend
        )
        assert response.id == backend


# -- failures -------------------------------------------------------------------------


async def test_sigkill_under_load_answers_every_request_and_refills(crashy: WorkerPool) -> None:
    await eventually(lambda: crashy.statistics().live_workers == 2)
    victim = crashy.pids()[0]
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            answer = await crashy.infer(
                request(x=np.array([i], np.float32), action="sleep", seconds=0.05)
            )
            outcomes[i] = int(answer.outputs[0].data[0])
        except BrokenWorker as exc:
            outcomes[i] = exc

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for i in range(24):
                group.start_soon(one, i)
            await eventually(lambda: len(outcomes) >= 4)
            os.kill(victim, signal.SIGKILL)
    assert len(outcomes) == 24
    broken = [v for v in outcomes.values() if isinstance(v, BrokenWorker)]
    assert len(broken) <= 1
    for exc in broken:
        assert f"of model 'echo' (pid {victim}) was killed by SIGKILL" in exc.message
    assert all(v == i for i, v in outcomes.items() if not isinstance(v, BrokenWorker))
    await eventually(lambda: crashy.statistics().live_workers == 2 and victim not in crashy.pids())
    assert not alive(victim)


@pytest.mark.parametrize(
    ("action", "how"), [("exit", "exited with code 3"), ("segfault", "was killed by SIGSEGV")]
)
async def test_a_worker_dying_in_predict_is_a_broken_worker(
    crashy: WorkerPool, action: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    await eventually(lambda: crashy.statistics().live_workers == 2)
    with pytest.raises(BrokenWorker, match=rf"worker \d+ of model 'echo' \(pid \d+\) {how}"):
        await crashy.infer(request(action=action))
    if action == "segfault":  # faulthandler's report reaches the log
        assert any("Segmentation fault" in r.getMessage() for r in caplog.records)
    assert crashy.ready  # the other worker still serves
    assert (await crashy.infer(request("next"))).id == "next"
    await eventually(lambda: crashy.statistics().live_workers == 2)


async def test_a_stuck_worker_is_killed_after_the_hard_timeout(sleepy: WorkerPool) -> None:
    pid = sleepy.pids()[0]
    with pytest.raises(
        InferenceTimeout, match=r"ran this request for more than 1\.5 s and was killed"
    ):
        await sleepy.infer(seconds(30.0))
    await eventually(lambda: sleepy.ready and sleepy.pids() != [pid])
    assert not alive(pid)
    assert (await sleepy.infer(seconds(0.0))).outputs[0].data.tolist() == [0.0]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [({"max_requests_per_worker": 2}, [0, 0, 1, 1]), ({"max_worker_memory_mb": 1}, [0, 1])],
)
async def test_worn_out_workers_are_recycled_without_failing_a_request(
    limit: dict[str, Any], expected: list[int]
) -> None:
    pool = WorkerPool(Echo(), PoolConfig(1, 4, **limit), metrics_sink=ignore)
    await pool.start()
    try:
        pids = []
        for _ in expected:
            answer = await pool.infer(request(action="pid"))
            pids.append(int(answer.outputs[0].data[0]))
    finally:
        await pool.stop()
    order = list(dict.fromkeys(pids))
    assert [order.index(pid) for pid in pids] == expected
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize(
    ("model", "workers", "reason"),
    [
        (FailsToLoad(), 2, "failed to load: RuntimeError: weights file is missing"),
        (DiesInLoad(), 1, "exited with code 7"),
    ],
)
async def test_load_failure_is_reported_without_hanging(
    model: Any, workers: int, reason: str
) -> None:
    pool = WorkerPool(model, PoolConfig(workers, 4), metrics_sink=ignore)
    with anyio.fail_after(60), pytest.raises(ModelNotReady, match=reason):
        await pool.start()
    assert not pool.ready and reason in (pool.reason or "")
    assert pool.pids() == [] and not our_arenas(f"{model.settings.name}-")
    with pytest.raises(ModelNotReady):
        await pool.infer(request())
    await pool.stop()


async def test_stop_fails_queued_requests_and_lets_running_ones_finish() -> None:
    pool = WorkerPool(Sleepy(), PoolConfig(1, 4), metrics_sink=ignore)
    await pool.start()
    outcomes: list[Any] = []

    async def call(value: float) -> None:
        try:
            outcomes.append((await pool.infer(seconds(value))).outputs[0].data.tolist())
        except ModelNotReady as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(call, 0.5)
        await eventually(lambda: pool.statistics().in_flight == 1)
        group.start_soon(call, 0.0)
        await eventually(lambda: pool.statistics().queued == 1)
        await pool.stop()
    assert outcomes[0].message == "model 'sleepy' is stopping"
    assert outcomes[1] == [0.5]


HOST = """
import sys, time
import anyio
import numpy as np
from v2mount.model import Model
from v2mount.metrics.custom import MetricUpdate
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.types import InferenceRequest, Tensor

class MainModel(Model):  # defined in __main__: dill sends it by value
    def load(self):
        time.sleep(60 if sys.argv[1] == "loading" else 0)

    def predict(self, payload):
        time.sleep(float(payload.parameters.get("sleep", 0)))
        return payload["x"]

async def serve(pool):
    await pool.start()
    x = np.ones(1 << 18, np.float32)
    answer = await pool.infer(InferenceRequest([Tensor("x", "FP32", x.shape, x)]))
    assert answer.outputs[0].data.sum() == x.size
    busy = InferenceRequest([Tensor("x", "FP32", (1,), x[:1])], parameters={"sleep": 60})
    await pool.infer(busy)  # one worker busy, one idle

async def main():
    pool = WorkerPool(MainModel(), PoolConfig(2, 4), metrics_sink=lambda _: None)
    async with anyio.create_task_group() as group:
        group.start_soon(serve, pool)
        busy = 1 if sys.argv[1] == "serving" else 0
        while len(pool.pids()) < 2 or pool.statistics().in_flight < busy:
            await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        print(*pool.pids(), flush=True)
        await anyio.sleep(120)

if __name__ == "__main__":
    anyio.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["loading", "serving"])
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, stage: str) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    command = [sys.executable, str(script), stage]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as host:
        try:
            assert host.stdout is not None
            pids = [int(pid) for pid in host.stdout.readline().split()]
            assert len(pids) == 2 and all(alive(pid) for pid in pids)
            if stage == "serving":  # the workers map their arenas, unnamed
                assert any(mapped_arenas(pid) for pid in pids)
        finally:
            host.kill()
    anyio.run(partial(eventually, lambda: not any(alive(pid) for pid in pids), seconds=15.0))
    assert not our_arenas(pid=host.pid)
