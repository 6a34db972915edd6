"""Helpers that test modules share: ``from tests.support import alive, eventually``.

Test modules are imported with ``--import-mode=importlib``, so one cannot import a
sibling; this module is imported through the ``tests`` package (the project root is on
``sys.path``, see ``pythonpath`` in pyproject.toml). Fixtures live in the conftest files.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Protocol

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from v2mount.errors import ModelError
from v2mount.metrics.custom import MetricUpdate
from v2mount.types import InferenceRequest, InferenceResponse

# -- processes (Linux ``/proc``) and servers ------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then the
    parent's pid), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, only waiting to be reaped, counts as gone)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int, *, zombies: bool = False) -> set[int]:
    """Every live descendant of ``pid``; with ``zombies``, the dead ones not yet waited
    for too (a ``Popen`` whose process is a zombie still needs its ``wait``)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and (zombies or fields[0] != "Z"):
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def name_of(pid: int) -> str:
    """The process's name (``/proc/PID/comm``)."""
    with open(f"/proc/{pid}/comm") as comm:
        return comm.read().strip()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, for a server subprocess to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def uvicorn(
    args: Sequence[str],
    log: Path,
    ready: Callable[[str], bool],
    *,
    within: float,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """``python -m uvicorn *args`` on a free loopback port, its output written to ``log``;
    yields its ``host:port`` once ``ready(host_port)`` holds (an error raised by ``ready``
    counts as not yet). Fails if it exits first or is not ready after ``within`` seconds.
    Terminated on exit (killed if it has not stopped after 20 s)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + within
        while True:
            if process.poll() is not None:
                raise AssertionError(f"uvicorn exited: {log.read_text()}")
            try:
                if ready(address):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn was not ready after {within} s: {log.read_text()}")
            time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- modules --------------------------------------------------------------------------


def load_module(path: Path, name: str) -> ModuleType:
    """The Python file ``path`` imported as module ``name`` (registered in ``sys.modules``,
    so pickles can name it), or the module already loaded under that name.

    Test models are loaded by path so that pool workers must get them by file, as they
    get a user's module they cannot import by name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- waiting --------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], bool],
    seconds: float = 60.0,
    *,
    interval: float = 0.02,
    explain: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` every ``interval`` until it holds: for state that another thread,
    process or task changes and no event announces. ``seconds`` only bounds a failing
    test; on timeout it raises ``TimeoutError``, or ``AssertionError(explain())``."""
    try:
        with anyio.fail_after(seconds):
            while not condition():  # noqa: ASYNC110 - state that no event announces
                await anyio.sleep(interval)
    except TimeoutError:
        if explain is None:
            raise
        raise AssertionError(f"not after {seconds} s: {explain()}") from None


# -- metrics --------------------------------------------------------------------------

#: Every sample of a scrape, by name and labels.
Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric_values(text: str) -> Figures:
    """The samples of a Prometheus text exposition, by name and labels."""
    found: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


async def scrape_metrics(client: httpx.AsyncClient) -> Figures:
    """``GET /metrics`` (which must answer 200), read back into numbers."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric_values(response.text)


# -- models and batchers --------------------------------------------------------------


def ignore(updates: list[MetricUpdate]) -> None:
    """A metrics sink for pools and runners whose metric updates no test reads."""


class Infers(Protocol):
    """A batcher (or anything else) that answers one request at a time."""

    async def infer(self, request: InferenceRequest, /) -> InferenceResponse: ...


async def infer_all(
    batcher: Infers, requests: Sequence[InferenceRequest], seconds: float = 10.0
) -> list[InferenceResponse | Exception]:
    """Send every request concurrently; each result is a response or the error raised."""
    results: list[InferenceResponse | Exception] = [ModelError("unanswered")] * len(requests)

    async def one(index: int) -> None:
        try:
            results[index] = await batcher.infer(requests[index])
        except Exception as exc:
            results[index] = exc

    with anyio.fail_after(seconds):
        async with anyio.create_task_group() as group:
            for index in range(len(requests)):
                group.start_soon(one, index)
    return results
