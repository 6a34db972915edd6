"""Workers forked from a pool's template process (``v2mount/pool/_template.py``).

Which process started a worker is read from ``/proc`` (its parent and its name), so
these tests run on Linux only, where templates are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import multiprocess
import numpy as np
import pytest

from tests.support import alive, eventually, ignore, load_module, name_of
from v2mount.errors import BrokenWorker, ModelNotReady
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.pool import _template as template_module
from v2mount.pool._arena import SHM_DIR
from v2mount.pool._ipc import Ready
from v2mount.pool._shipping import pack_model
from v2mount.pool._template import TEMPLATE_NAME, Template
from v2mount.pool._worker import WORKER_NAME, WorkerSpec
from v2mount.types import InferenceRequest, Tensor

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="templates need Linux pidfds"),
]

HERE = Path(__file__).parent


#: Loaded by path: the template must execute them by file, as workers do.
draws, seeded, threaded = (
    load_module(HERE / f"{name}.py", f"v2mount_test_{name}")
    for name in ("template_models", "seeded_models", "threaded_models")
)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def request(seconds: float = 0.0) -> InferenceRequest:
    x = Tensor("x", "FP32", (1,), np.zeros(1, np.float32))
    return InferenceRequest([x], parameters={"seconds": seconds})


async def per_worker(pool: WorkerPool, want: int) -> dict[int, float]:
    """Each worker's first random draw, by pid: pairs of slow requests until ``want`` answered."""
    seen: dict[int, float] = {}

    async def ask() -> None:
        response = await pool.infer(request(0.2))
        outputs = {t.name: t.data for t in response.outputs}
        seen[int(outputs["pid"][0])] = float(outputs["first"][0])

    with anyio.fail_after(60):
        while len(seen) < want:
            async with anyio.create_task_group() as group:
                for _ in range(want):
                    group.start_soon(ask)
    return seen


@contextlib.contextmanager
def started(pool: WorkerPool) -> Iterator[WorkerPool]:
    anyio.run(pool.start)
    try:
        yield pool
    finally:
        anyio.run(pool.stop)


@pytest.fixture(scope="module")
def draw() -> Iterator[WorkerPool]:
    with started(WorkerPool(draws.Draw(), PoolConfig(2, 16), metrics_sink=ignore)) as pool:
        yield pool


def template_of(pool: WorkerPool) -> int:
    """The one template process the pool's workers were forked from."""
    parents = {parent_of(pid) for pid in pool.pids()}
    assert len(parents) == 1, parents
    template = parents.pop()
    assert name_of(template) == TEMPLATE_NAME and parent_of(template) == os.getpid()
    return template


# -- the template on its own -----------------------------------------------------------


def test_a_forked_worker_can_be_watched_killed_and_reaped() -> None:
    logs: list[tuple[int, str]] = []
    packages = {0: pack_model(draws.Draw())}
    template = Template(
        multiprocess.get_context("spawn"), packages, 1, "draw", lambda *entry: logs.append(entry)
    )
    template.start()
    try:
        spec = WorkerSpec(1, (0,), os.getpid(), None, 1 << 16, 1, logging.WARNING)
        log = lambda *entry: logs.append(entry)  # noqa: E731
        worker = template.fork_worker(spec, packages, "v2mount-draw-1", log)
        assert template.pid is not None and parent_of(worker.pid) == template.pid
        # What the model's module printed on import, in the template, reached the log.
        assert (logging.INFO, "template: template_models imported") in logs
        assert worker.events.poll(60)
        assert worker.events.recv() == Ready(0, [], None)
        assert name_of(worker.pid) == WORKER_NAME and name_of(template.pid) == TEMPLATE_NAME
        resident = worker.resident_mb()
        assert resident is not None and resident > 0
        assert select.select([worker.exit_fd], [], [], 0)[0] == []
        worker.kill()
        assert select.select([worker.exit_fd], [], [], 60)[0] == [worker.exit_fd]
        worker.reap(60)
        assert worker.describe_exit() == "was killed by SIGKILL"
        worker.dispose()
        first = template.pid
    finally:
        template.stop()
    assert template.pid is None and not alive(first)


def test_without_pidfds_workers_are_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_module, "template_supported", lambda: False)
    pool = WorkerPool(draws.Draw(), PoolConfig(1, 4), metrics_sink=ignore)
    with started(pool):
        assert [parent_of(pid) for pid in pool.pids()] == [os.getpid()]
        response = anyio.run(pool.infer, request())
        assert response.outputs[0].data.tolist() == pool.pids()


# -- pools -----------------------------------------------------------------------------


async def test_workers_fork_from_one_template_and_draw_their_own_numbers(
    draw: WorkerPool,
) -> None:
    template = template_of(draw)
    assert all(name_of(pid) == WORKER_NAME for pid in draw.pids())
    firsts = await per_worker(draw, 2)
    assert set(firsts) == set(draw.pids())
    # numpy's generator was reseeded in each worker: no two share a random stream.
    assert len(set(firsts.values())) == 2
    assert template_of(draw) == template


async def test_killed_serving_workers_are_replaced_by_forks_of_the_same_template(
    draw: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    template = template_of(draw)
    for _ in range(5):
        await draw.infer(request())
        victim = draw.pids()[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda v=victim: draw.statistics().live_workers == 2 and v not in draw.pids()
        )
        # The template reaped the worker and told the pool how it ended.
        assert f"(pid {victim}) was killed by SIGKILL; replacing it" in caplog.text
    assert template_of(draw) == template and alive(template)


async def test_a_request_on_a_killed_forked_worker_fails_alone(draw: WorkerPool) -> None:
    await eventually(lambda: draw.statistics().live_workers == 2)
    victim = draw.pids()[0]
    outcomes: list[str] = []

    async def ask() -> None:
        try:
            await draw.infer(request(1.0))
        except BrokenWorker as exc:
            outcomes.append(str(exc))
        else:
            outcomes.append("ok")

    async with anyio.create_task_group() as group:
        group.start_soon(ask)
        group.start_soon(ask)
        await eventually(lambda: draw.statistics().in_flight == 2)
        os.kill(victim, signal.SIGKILL)
    failed = [text for text in outcomes if text != "ok"]
    assert outcomes.count("ok") == 1 and len(failed) == 1
    assert f"(pid {victim}) was killed by SIGKILL" in failed[0]


def test_a_killed_template_is_restarted_and_workers_keep_serving() -> None:
    pool = WorkerPool(draws.Draw(), PoolConfig(1, 4), metrics_sink=ignore)
    with started(pool):
        first = template_of(pool)
        orphan = pool.pids()[0]
        os.kill(first, signal.SIGKILL)
        anyio.run(eventually, lambda: not alive(first))
        served = anyio.run(pool.infer, request())
        assert served.outputs[0].data.tolist() == [orphan]  # its worker lives on
        # Replacements are spawned until a new template is ready, then forked from it.
        seen = {orphan}
        for _ in range(30):
            victim = pool.pids()[0]
            os.kill(victim, signal.SIGKILL)
            anyio.run(
                eventually,
                lambda v=victim: pool.statistics().live_workers == 1 and v not in pool.pids(),
            )
            seen.update(pool.pids())
            parent = parent_of(pool.pids()[0])
            if parent != os.getpid():
                break
        assert parent not in (first, os.getpid()) and name_of(parent) == TEMPLATE_NAME
        assert anyio.run(pool.infer, request()).outputs[0].data.tolist() == pool.pids()
    assert not [pid for pid in (*seen, parent) if alive(pid)]


def test_a_kill_storm_under_load_heals_from_the_same_template(draw: WorkerPool) -> None:
    """Kill whichever worker answered last, as soon as a new one answered, 10 times."""
    anyio.run(eventually, lambda: draw.statistics().live_workers == 2)
    template = template_of(draw)
    failures: list[str] = []
    served: list[int] = []
    killed: list[int] = []

    async def storm() -> None:
        stop = anyio.Event()

        async def caller() -> None:
            while not stop.is_set():
                try:
                    response = await draw.infer(request())
                except (BrokenWorker, ModelNotReady) as exc:
                    failures.append(type(exc).__name__)
                    await anyio.sleep(0.01)
                else:
                    served.append(int(response.outputs[0].data[0]))

        async with anyio.create_task_group() as group:
            for _ in range(16):
                group.start_soon(caller)
            while len(killed) < 10:
                await eventually(lambda: bool(served) and served[-1] not in killed)
                killed.append(served[-1])
                os.kill(killed[-1], signal.SIGKILL)
            await eventually(
                lambda: draw.statistics().live_workers == 2 and not set(killed) & set(draw.pids())
            )
            stop.set()

    anyio.run(storm)
    # The template outlived the storm and forked every replacement: none was spawned.
    assert template_of(draw) == template
    assert set(failures) <= {"BrokenWorker", "ModelNotReady"}
    assert anyio.run(draw.infer, request()).outputs[0].data[0] not in killed


def test_a_module_that_starts_a_thread_gets_spawned_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount.pool")
    pool = WorkerPool(threaded.Threaded(), PoolConfig(1, 4), metrics_sink=ignore)
    with started(pool):
        assert [parent_of(pid) for pid in pool.pids()] == [os.getpid()]
        assert anyio.run(pool.infer, request()).outputs[0].data.tolist() == [os.getpid()]
    assert "importing the model's module started a thread" in caplog.text


async def test_a_model_the_template_cannot_unpickle_fails_to_load_as_spawned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="v2mount.pool")
    pool = WorkerPool(draws.Unpicklable(), PoolConfig(1, 4), metrics_sink=ignore)
    with pytest.raises(ModelNotReady, match="failed to load: RuntimeError: unpickled in another"):
        await pool.start()
    assert "spawned, not forked: the template cannot unpickle the model" in caplog.text
    # The template's traceback is logged too.
    assert "template: RuntimeError: unpickled in another process" in caplog.text


async def test_a_module_that_seeds_numpy_seeds_every_worker_alike() -> None:
    pool = WorkerPool(seeded.SeededDraw(), PoolConfig(2, 16), metrics_sink=ignore)
    await pool.start()
    try:
        template_of(pool)
        firsts = await per_worker(pool, 2)
    finally:
        await pool.stop()
    # As with spawned workers, each of which ran ``np.random.seed(7)`` on import.
    assert list(firsts.values()) == [np.random.RandomState(7).random()] * 2


HOST = """
import os
import sys
from pathlib import Path
import anyio
sys.path.insert(0, sys.argv[1])
import numpy as np
import template_models
from v2mount.pool import PoolConfig, WorkerPool, _template
from v2mount.types import InferenceRequest, Tensor

async def main():
    if sys.argv[2] == "spawned":
        _template.template_supported = lambda: False
    pool = WorkerPool(template_models.Draw(), PoolConfig(2, 4), metrics_sink=list)
    await pool.start()
    x = Tensor("x", "FP32", (1,), np.zeros(1, np.float32))
    async with anyio.create_task_group() as group:
        # One worker busy (only its pidfd watch can tell it the parent died), one idle.
        group.start_soon(pool.infer, InferenceRequest([x], parameters={"seconds": 120}))
        while pool.statistics().in_flight < 1:
            await anyio.sleep(0.01)
        # To a file: stdout also gets the prints of spawned workers importing this script.
        Path(sys.argv[3] + ".tmp").write_text(" ".join(map(str, pool.pids())))
        os.replace(sys.argv[3] + ".tmp", sys.argv[3])
        await anyio.sleep(120)

if __name__ == "__main__":
    anyio.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", ["forked", "spawned"])
def test_the_template_and_its_workers_exit_with_the_parent(tmp_path: Path, start: str) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    written = tmp_path / "pids"
    command = [sys.executable, str(script), str(HERE), start, str(written)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL) as host:
        try:
            anyio.run(eventually, written.exists, 60.0)
            workers = [int(pid) for pid in written.read_text().split()]
            parents = {parent_of(pid) for pid in workers}
            assert len(workers) == 2 and len(parents) == 1
            if start == "forked":
                assert parent_of(next(iter(parents))) == host.pid
            else:
                assert parents == {host.pid}
        finally:
            host.kill()
    left = [*workers, *parents - {host.pid}]
    anyio.run(eventually, lambda: not any(alive(pid) for pid in left), 15.0)
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(f"v2mount-{host.pid}-")]
