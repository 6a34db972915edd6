"""RayPool on one local Ray instance (loopback clients only), on asyncio and trio.

Ray starts once for this module (``ray.init(num_cpus=2, include_dashboard=False)``); its
usage statistics are off, so nothing leaves the machine. Pools shared by several tests
are started and stopped with ``anyio.run`` on loops of their own, so the tests also show
that a pool serves callers on other event loops. Every wait is on observable state (a
file a model wrote, the pool's statistics, a process gone), never on time.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from tests import support
from tests.support import alive, descendants, load_module
from v2mount import V2App
from v2mount.codecs.tensor import datatype_to_dtype
from v2mount.errors import (
    BadRequest,
    BrokenWorker,
    InferenceTimeout,
    ModelError,
    ModelNotReady,
    Overloaded,
)
from v2mount.metrics.app import AppMetrics
from v2mount.metrics.custom import MetricUpdate
from v2mount.ray_pool import RayPool
from v2mount.registry import ModelHandle
from v2mount.settings import ModelSettings, Settings
from v2mount.types import DATATYPES, InferenceRequest, InferenceResponse, Tensor

ray = pytest.importorskip("ray")  # in the dev extra: CI always has it
ray_constants = ray._private.ray_constants

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


#: Loaded by path: actors must cope with a module they cannot import by name.
models = load_module(Path(__file__).with_name("ray_pool_models.py"), "v2mount_test_ray_pool_models")

#: Nothing leaves the machine: no usage statistics, and a one-node Ray on 127.0.0.1 (by
#: default Ray listens on the machine's routable address, which it finds by asking the
#: kernel for a route to a public one).
#: And its GCS gets 120 s (not 30) to write its port file: on a loaded 2-core machine it
#: has taken longer.
LOOPBACK_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_gcs_server_port_wait_time_s": "120",
}


def test_the_test_ray_listens_on_loopback_only() -> None:
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def _start_ray() -> None:
    """``ray.init``, given a second chance: Ray waits a fixed 30 s for its raylet to
    register (``node.py``), which a loaded 2-core machine has missed.

    A failed start leaves its processes running, out of ``ray.shutdown``'s reach (the
    node object that holds them is not kept): they are killed and their ``Popen``
    handles waited on before the second start, so none outlives it or is found unwaited
    when collected (a ``ResourceWarning``).
    """
    for attempt in (1, 2):
        before = descendants(os.getpid(), zombies=True)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            leftovers = descendants(os.getpid(), zombies=True) - before
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for process in gc.get_objects():  # Ray's handles on them, to collect them
                if isinstance(process, subprocess.Popen) and process.pid in leftovers:
                    process.wait(timeout=60)
            if attempt == 2:
                raise


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray for the module; what ``ray.init`` changes in this process is undone."""
    environ, excepthook = dict(os.environ), sys.excepthook
    sigterm = signal.getsignal(signal.SIGTERM)
    os.environ.update(LOOPBACK_RAY_ENV)  # for the processes Ray starts
    # This process imported Ray already, which read that variable then.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    try:
        _start_ray()
        yield
    finally:
        ray.shutdown()
        monkeypatch.undo()
        os.environ.clear()
        os.environ.update(environ)
        sys.excepthook = excepthook
        signal.signal(signal.SIGTERM, sigterm)


class Sink:
    def __init__(self) -> None:
        self.updates: list[MetricUpdate] = []

    def __call__(self, updates: list[MetricUpdate]) -> None:
        self.updates.extend(updates)


def ray_pool(model: Any, workers: int = 2, **options: Any) -> RayPool:
    options.setdefault("max_queue_size", 16)
    options.setdefault("metrics_sink", Sink())
    # The tests' Ray has 2 CPUs: actors reserve none, so replacements always fit.
    options.setdefault("actor_options", {"num_cpus": 0})
    return RayPool(model, workers, **options)


#: Polls state that Ray's threads and the pool's supervisor change.
eventually = functools.partial(support.eventually, seconds=120.0)


def every_datatype() -> InferenceRequest:
    tensors = []
    for datatype in DATATYPES:
        if datatype == "BYTES":
            data = np.array([b"a", b"", b"\x00\xff"], dtype=object)
        elif datatype == "BOOL":
            data = np.array([True, False, True])
        else:
            data = np.arange(6).reshape(2, 3).astype(datatype_to_dtype(datatype))
        tensors.append(Tensor(datatype.lower(), datatype, data.shape, data))
    big = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)  # 4 MB
    tensors.append(Tensor("big", "FP32", big.shape, big))
    return InferenceRequest(tensors, id="all", parameters={"p": 1})


def gated(tmp_path: Path, name: str) -> tuple[InferenceRequest, Path, Path]:
    """A Gate request, the file its actor's pid appears in, the file that releases it."""
    pidfile, gate = tmp_path / f"{name}.pid", tmp_path / f"{name}.gate"
    request = InferenceRequest(
        [Tensor("x", "FP32", (1,), np.zeros(1, np.float32))],
        id=name,
        parameters={"pidfile": str(pidfile), "gate": str(gate)},
    )
    return request, pidfile, gate


def quick(name: str = "q") -> InferenceRequest:
    return InferenceRequest([Tensor("x", "FP32", (1,), np.zeros(1, np.float32))], id=name)


def echo_handle(backend: str, workers: int) -> ModelHandle:
    """A served Echo model (its registry handle), on ``backend``'s pool."""
    settings = ModelSettings(
        name="echo",
        parallel_workers=workers,
        pool_backend=backend,
        ray_actor_options={"num_cpus": 0},
    )
    return ModelHandle(models.Echo(settings), Settings(), AppMetrics())


@pytest.fixture(scope="module")
def echo_handles() -> Iterator[tuple[ModelHandle, ModelHandle]]:
    on_ray, on_processes = echo_handle("ray", 2), echo_handle("process", 1)
    for handle in (on_ray, on_processes):
        anyio.run(handle.load)
        assert handle.ready, handle.reason
    yield on_ray, on_processes
    for handle in (on_ray, on_processes):
        anyio.run(handle.unload)


def outputs(response: InferenceResponse) -> dict[str, Tensor]:
    return {t.name: t for t in response.outputs if t.name != "pid"}


def pid_of(response: InferenceResponse) -> int:
    return int(response.output("pid").data[0])


async def test_answers_match_the_process_pool_for_every_datatype(
    echo_handles: tuple[ModelHandle, ModelHandle],
) -> None:
    on_ray, on_processes = echo_handles
    request = every_datatype()
    by_ray, by_process = await on_ray.infer(request), await on_processes.infer(request)
    assert (by_ray.id, by_ray.model_name) == (by_process.id, by_process.model_name)
    assert (by_ray.id, by_ray.model_name) == ("all", "echo")
    assert pid_of(by_ray) != os.getpid()
    sent = {t.name: t for t in request.inputs}
    got, expected = outputs(by_ray), outputs(by_process)
    assert set(got) == set(expected) == set(sent)
    for name, tensor in got.items():
        assert (tensor.datatype, tensor.shape) == (expected[name].datatype, expected[name].shape)
        assert tensor.datatype == sent[name].datatype
        np.testing.assert_array_equal(tensor.data, expected[name].data)
        np.testing.assert_array_equal(tensor.data, sent[name].data)


async def test_requests_spread_over_the_actors(
    echo_handles: tuple[ModelHandle, ModelHandle],
) -> None:
    on_ray, _ = echo_handles
    pids: set[int] = set()

    async def one(i: int) -> None:
        pids.add(pid_of(await on_ray.infer(quick(str(i)))))

    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(one, i)
    assert len(pids) == 2 and os.getpid() not in pids
    stats = on_ray.runner_statistics()
    assert stats is not None
    assert (stats.workers, stats.live_workers, stats.queued, stats.in_flight) == (2, 2, 0, 0)


async def test_adaptive_batches_cross_to_an_actor_as_one_call() -> None:
    settings = ModelSettings(
        name="rows",
        parallel_workers=1,
        pool_backend="ray",
        ray_actor_options={"num_cpus": 0},
        max_batch_size=4,
        max_batch_time=30,  # the batch goes when its 4 rows are in, long before that
    )
    handle = ModelHandle(models.Rows(settings), Settings(), AppMetrics())
    await handle.load()
    assert handle.ready, handle.reason
    answers: dict[int, InferenceResponse] = {}

    async def one(i: int) -> None:
        x = np.array([[float(i), -float(i)]], np.float32)
        answers[i] = await handle.infer(InferenceRequest([Tensor("x", "FP32", (1, 2), x)]))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
    finally:
        await handle.unload()
    assert sorted(answers) == [0, 1, 2, 3]
    for i, response in answers.items():
        np.testing.assert_array_equal(response.output("x").data, [[i, -i]])
        assert response.output("rows").data.tolist() == [4]


async def test_an_async_model_and_custom_metrics_cross_from_actors() -> None:
    sink = Sink()
    model = models.AsyncDouble()
    pool = ray_pool(model, workers=1, metrics_sink=sink)
    declared = await pool.start()
    # What load declared in the actor comes back to the caller, to serve as metadata;
    # the model's own settings are left as they were.
    assert declared is not None and declared.outputs == []
    assert [(s.name, s.datatype, s.shape) for s in declared.inputs] == [("x", "FP32", [-1])]
    assert model.settings.inputs == []
    try:
        x = np.array([1.5, 2.0], np.float32)
        response = await pool.infer(InferenceRequest([Tensor("x", "FP32", (2,), x)]))
        np.testing.assert_array_equal(response.outputs[0].data, x * 2)
    finally:
        await pool.stop()
    echo = ray_pool(models.Echo(), workers=1, metrics_sink=sink)
    await echo.start()
    await echo.stop()
    assert "echo_loads" in {update.name for update in sink.updates}


async def test_errors_in_predict_cross_as_they_do_from_worker_processes() -> None:
    pool = ray_pool(models.Refuses(), workers=1)
    await pool.start()
    try:
        request = quick()
        request.parameters = {"raise": "value"}
        with pytest.raises(ModelError, match="ValueError: bad input, refused"):
            await pool.infer(request)
        request.parameters = {"raise": "bad_request"}
        with pytest.raises(BadRequest, match="you asked for it"):
            await pool.infer(request)
        response = await pool.infer(quick())
        assert response.output("ok").data.tolist() == [1]
        assert pool.statistics().live_workers == 1
    finally:
        await pool.stop()


async def test_a_model_that_fails_to_load_reports_why() -> None:
    pool = ray_pool(models.FailsToLoad(), workers=2)
    with pytest.raises(ModelNotReady, match="RuntimeError: weights file is missing"):
        await pool.start()
    assert not pool.ready
    assert pool.pids() == []


async def test_a_killed_actor_fails_only_its_request_and_is_replaced(tmp_path: Path) -> None:
    pool = ray_pool(models.Gate(), workers=2)
    await pool.start()
    first_pids = set(pool.pids())
    results: dict[str, Any] = {}

    async def call(request: InferenceRequest) -> None:
        try:
            results[str(request.id)] = await pool.infer(request)
        except Exception as exc:
            results[str(request.id)] = exc

    victim, victim_pid, _ = gated(tmp_path, "victim")
    survivor, survivor_pid, survivor_gate = gated(tmp_path, "survivor")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, victim)
            tg.start_soon(call, survivor)
            await eventually(lambda: victim_pid.exists() and survivor_pid.exists())
            # One waits behind each gated request in its actor, one in the pool's queue.
            for i in range(3):
                tg.start_soon(call, quick(f"queued-{i}"))
            await eventually(lambda: pool.statistics().queued == 1)
            assert pool.statistics().in_flight == 5
            killed = int(victim_pid.read_text())
            (handle,) = [a.handle for a in pool._actors.values() if a.pid == killed]
            ray.kill(handle)
            # The one behind the victim and the queued one go to the replacement while
            # the survivor (and the one behind it) still wait.
            await eventually(lambda: len(results) == 3)
            assert "survivor" not in results
            survivor_gate.touch()
        assert isinstance(results["victim"], BrokenWorker)
        assert "died while running this request" in results["victim"].message
        answered = [r for name, r in results.items() if name != "victim"]
        assert len(answered) == 4 and all(isinstance(r, InferenceResponse) for r in answered)
        answering = {int(r.outputs[0].data[0]) for r in answered}
        await eventually(lambda: pool.statistics().live_workers == 2)
        now = set(pool.pids())
        assert killed not in now and int(survivor_pid.read_text()) in now
        assert len(now - first_pids) == 1
        assert answering == now  # the replacement answered; the killed actor never did
        await eventually(lambda: not alive(killed))
    finally:
        await pool.stop()


async def test_actors_killed_under_a_stream_of_requests_cost_one_request_each() -> None:
    pool = ray_pool(models.Echo(), workers=2, max_queue_size=64)
    await pool.start()
    outcomes: list[Any] = []
    streaming = True

    async def caller(n: int) -> None:
        i = 0
        while streaming:
            i += 1
            try:
                outcomes.append(await pool.infer(quick(f"{n}-{i}")))
            except Exception as exc:
                outcomes.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(caller, n)
            for _ in range(2):
                await eventually(lambda: pool.statistics().live_workers == 2)
                await eventually(lambda: pool.statistics().in_flight >= 3)
                ray.kill(next(iter(pool._actors.values())).handle)
                await eventually(lambda: pool.statistics().live_workers < 2)
            streaming = False
        broken = [o for o in outcomes if isinstance(o, BrokenWorker)]
        others = [o for o in outcomes if isinstance(o, Exception) and o not in broken]
        # Each kill fails at most the request its actor was running; the requests waiting
        # in it and in the queue go to the other actor, so nothing else is lost.
        assert others == [] and len(broken) <= 2
        assert len(outcomes) - len(broken) > 16
        await eventually(lambda: pool.statistics().live_workers == 2)
        assert pool.statistics().in_flight == 0
    finally:
        await pool.stop()


async def test_readiness_follows_the_actors(tmp_path: Path) -> None:
    pool = ray_pool(models.Gate(), workers=1)
    await pool.start()
    try:
        assert pool.ready
        (pid,) = pool.pids()
        (handle,) = [a.handle for a in pool._actors.values()]
        ray.kill(handle)
        await eventually(lambda: not pool.ready)  # noticed with no request in flight
        assert "died" in (pool.reason or "")
        with pytest.raises(ModelNotReady):
            await pool.infer(quick())
        await eventually(lambda: pool.ready)
        assert pool.pids() != [pid]
        assert isinstance(await pool.infer(quick()), InferenceResponse)
    finally:
        await pool.stop()


async def test_a_request_past_the_hard_timeout_kills_its_actor(tmp_path: Path) -> None:
    pool = ray_pool(models.Gate(), workers=1, hard_timeout=0.5)
    await pool.start()
    try:
        (pid,) = pool.pids()
        request, _, _ = gated(tmp_path, "stuck")  # never released
        with pytest.raises(InferenceTimeout, match=r"longer than 0\.5 s"):
            await pool.infer(request)
        await eventually(lambda: pool.ready and pool.pids() != [pid])
        assert isinstance(await pool.infer(quick()), InferenceResponse)
    finally:
        await pool.stop()


async def test_a_full_queue_is_refused_and_a_cancelled_request_leaves_it(tmp_path: Path) -> None:
    pool = ray_pool(models.Gate(), workers=1, max_queue_size=1)
    await pool.start()
    try:
        running, pidfile, gate = gated(tmp_path, "running")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.infer, running)
            await eventually(pidfile.exists)
            # The first waits in the actor, behind the running one; the second queues.
            tg.start_soon(pool.infer, quick("pipelined"))
            tg.start_soon(pool.infer, quick("queued"))
            await eventually(lambda: pool.statistics().queued == 1)
            with pytest.raises(Overloaded, match="1 requests waiting"):
                await pool.infer(quick("refused"))
            tg.cancel_scope.cancel()  # the callers leave: the queued request is withdrawn
        stats = pool.statistics()
        assert (stats.queued, stats.in_flight) == (0, 2)  # the actor still holds two
        gate.touch()
        assert isinstance(await pool.infer(quick("after")), InferenceResponse)
        await eventually(lambda: pool.statistics().in_flight == 0)  # dropped results freed
    finally:
        await pool.stop()


async def test_stop_releases_every_actor_and_two_pools_own_their_own() -> None:
    one, two = ray_pool(models.Echo()), ray_pool(models.Echo(), workers=1)
    await one.start()
    await two.start()
    pids_one, pids_two = one.pids(), two.pids()
    assert len(pids_one) == 2 and len(pids_two) == 1 and not set(pids_one) & set(pids_two)
    handles = [a.handle for a in one._actors.values()]
    await one.stop()
    assert not one.ready and one.pids() == []
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            await anyio.to_thread.run_sync(ray.get, handle.watch.remote())
    await eventually(lambda: not any(alive(pid) for pid in pids_one))
    with pytest.raises(ModelNotReady, match="stopped"):
        await one.infer(quick())
    assert isinstance(await two.infer(quick()), InferenceResponse)
    assert two.pids() == pids_two
    await two.stop()
    await two.stop()  # idempotent
    await eventually(lambda: not any(alive(pid) for pid in pids_two))


async def test_an_app_serves_a_model_on_ray_with_deadlines_and_backpressure(
    tmp_path: Path, serve: Any
) -> None:
    gate_model = models.Gate(
        ModelSettings(
            name="gate",
            parallel_workers=1,
            pool_backend="ray",
            ray_actor_options={"num_cpus": 0},
            inference_timeout=1,
            max_queue_size=1,
        )
    )
    app = V2App([gate_model], settings=Settings(pool_backend="process"))
    async with serve(app) as client:
        ready = await client.get("/v2/models/gate/ready")
        assert ready.status_code == 200
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}
        pidfile = tmp_path / "held.pid"
        held = {**body, "parameters": {"pidfile": str(pidfile), "gate": str(tmp_path / "g")}}
        late = await client.post("/v2/models/gate/infer", json=held)
        assert late.status_code == 504
        assert "did not answer within 1 s" in late.json()["error"]
        # The deadline dropped the request; the actor still runs it, so the next waits.
        async with anyio.create_task_group() as tg:
            for _ in range(2):  # one waits in the actor behind the late one, one queues
                tg.start_soon(functools.partial(client.post, "/v2/models/gate/infer", json=body))
            await eventually(lambda: app_queued(app) == 1)
            full = await client.post("/v2/models/gate/infer", json=body)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "waiting for a worker" in full.json()["error"]
            (tmp_path / "g").touch()
        answered = await client.post("/v2/models/gate/infer", json=body)
        assert answered.status_code == 200, answered.text
        assert answered.json()["outputs"][0]["name"] == "pid"


def app_queued(app: V2App) -> int:
    (handle,) = list(app.registry.handles())
    stats = handle.runner_statistics()
    return stats.queued if stats is not None else -1


STARTS_ITS_OWN_RAY = """
import importlib.util, sys
import anyio, numpy as np, ray
from v2mount.ray_pool import RayPool
from v2mount.types import InferenceRequest, Tensor

spec = importlib.util.spec_from_file_location("shipped_models", sys.argv[1])
models = importlib.util.module_from_spec(spec)
sys.modules["shipped_models"] = models
spec.loader.exec_module(models)

async def main():
    pool = RayPool(models.Echo(), 1, max_queue_size=4, metrics_sink=lambda updates: None,
                   actor_options={"num_cpus": 0})
    await pool.start()
    x = np.arange(3, dtype=np.float32)
    response = await pool.infer(InferenceRequest([Tensor("x", "FP32", (3,), x)]))
    await pool.stop()
    print(ray.is_initialized(), response.output("x").data.tolist(), pool.ready)

anyio.run(main)
"""


def test_a_pool_starts_a_local_ray_when_none_runs() -> None:
    """The default path (``ray_address`` unset, Ray not initialised), in a fresh process."""
    env = {**os.environ, **LOOPBACK_RAY_ENV}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            STARTS_ITS_OWN_RAY,
            str(Path(__file__).with_name("ray_pool_models.py")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True [0.0, 1.0, 2.0] False"
