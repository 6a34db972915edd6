"""Shutdown: SIGTERM (and SIGKILL) to uvicorn under load leaves no process and no arena."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

pytestmark = pytest.mark.slow

PATH = "/v2/models/faulty/infer"
#: Each request holds a worker this long, so requests are queued when the signal comes.
SLEEP = 0.05
#: Requests sent this close before the signal may meet a connection being closed.
EDGE = 0.2


@pytest.fixture
def repository(harness: ModuleType, tmp_path: Path) -> Path:
    folder = tmp_path / "repository"
    markers = tmp_path / "markers"
    markers.mkdir()
    harness.write_model(
        folder,
        "faulty",
        implementation="reliability_models.Faulty",
        parallel_workers=2,
        parameters={"marker_dir": str(markers)},
    )
    return folder


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


async def gone(pids: set[int], harness: ModuleType) -> float:
    """Seconds until none of ``pids`` is alive."""

    def left() -> set[int]:
        return {pid for pid in pids if harness.alive(pid)}

    return float(await harness.until(lambda: not left(), 15, lambda: f"left behind: {left()}"))


def test_sigterm_under_load(
    launch: Any, repository: Path, harness: ModuleType, profile: Any, figures: Any
) -> None:
    shm_before = shm_entries()
    server = launch(repository)
    processes = harness.descendants(server.pid)
    workers = server.workers()
    assert len(workers) == 2 and len(server.arenas()) <= 2
    load = harness.Load(server.url, 30, profile.concurrency)
    body = harness.infer_body(sleep=SLEEP)
    phase = "before"
    measured: dict[str, float] = {}

    async def terminate(stop: anyio.Event) -> None:
        nonlocal phase
        await anyio.sleep(profile.shutdown_seconds)
        phase = "edge"
        await anyio.sleep(EDGE)
        phase = "after"
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        await harness.until(lambda: server.process.poll() is not None, 60)
        measured["exit"] = time.monotonic() - signalled
        measured["reaped"] = await gone(processes, harness) + measured["exit"]
        stop.set()

    async def scenario() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(terminate, stop)
            await load.closed_loop(lambda _: (phase, PATH, body), profile.concurrency, 120, stop)

    anyio.run(scenario)
    before, after = (
        load.tallies["before"],
        harness.total({k: v for k, v in load.tallies.items() if k != "before"}),
    )
    figures.add_tally(
        "shutdown",
        f"SIGTERM to uvicorn after {profile.shutdown_seconds:g} s of load, "
        f"concurrency {profile.concurrency}",
        harness.total(load.tallies),
        measured["reaped"],
        f"sent before the signal: {before.ok}/{before.sent} OK; in the last {EDGE:g} s or "
        f"after: {after.ok} OK, {after.refused} refused, {after.dropped} connections closed "
        f"unanswered, {dict(after.statuses)}; exit after {measured['exit']:.2f} s",
    )
    # Every request sent before shutdown began is served: uvicorn drains its
    # connections, then the lifespan stops the pools.
    assert before.ok == before.sent > 0, before
    assert after.hung == 0 and not after.malformed
    assert set(after.statuses) <= {503}, after.errors
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert processes >= workers  # and every one of them is gone (``gone`` above)
    assert server.arenas() == set()
    assert not {name for name in shm_entries() - shm_before if f"-{server.pid}-" in name}


def test_sigkill_of_the_server_under_load(
    launch: Any, repository: Path, harness: ModuleType, figures: Any
) -> None:
    """A crashed web process: its workers exit on their own and remove their arenas."""
    server = launch(repository)
    processes = harness.descendants(server.pid)
    assert len(server.workers()) == 2
    load = harness.Load(server.url, 30, 8)
    body = harness.infer_body(sleep=SLEEP)
    measured: dict[str, float] = {}

    async def kill(stop: anyio.Event) -> None:
        await anyio.sleep(0.3)
        server.signal(signal.SIGKILL)
        measured["reaped"] = await gone(processes, harness)
        stop.set()

    async def scenario() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill, stop)
            await load.closed_loop(lambda _: ("load", PATH, body), 8, 60, stop)

    anyio.run(scenario)
    tally = load.tallies["load"]
    figures.add_tally(
        "shutdown",
        "SIGKILL to uvicorn under load (concurrency 8)",
        tally,
        measured["reaped"],
        f"{tally.dropped} connections closed unanswered, {tally.refused} refused "
        "(the server is gone); recovery = until every worker exited",
    )
    assert tally.hung == 0 and tally.ok > 0
    assert server.arenas() == set()
