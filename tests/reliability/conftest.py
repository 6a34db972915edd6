"""Harness of the reliability suites: profiles, a real server, load, pools seen from outside.

``V2MOUNT_RELIABILITY_PROFILE=short`` (the default, run in CI) or ``long`` sizes every
suite (see ``PROFILES``). Each suite records its figures in ``figures``; they are printed
at the end of the run, and written as JSON to ``$V2MOUNT_RELIABILITY_FIGURES`` when set.

The load is generated in the test process on asyncio (``anyio.run`` from a plain test):
the server under test is a subprocess, so which loop the client uses does not matter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import orjson
import pytest

from tests.support import alive, descendants, free_port, load_module, stat_fields
from v2mount.pool._template import TEMPLATE_NAME

HERE = Path(__file__).resolve().parent
SHM = Path("/dev/shm")
PROFILE_VARIABLE = "V2MOUNT_RELIABILITY_PROFILE"
FIGURES_VARIABLE = "V2MOUNT_RELIABILITY_FIGURES"


# -- profiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How hard and how long each suite pushes."""

    name: str
    concurrency: int
    storm_seconds: float
    fault_seconds: float
    overload_seconds: float
    recovery_seconds: float
    shutdown_seconds: float
    examples: int


PROFILES = {
    "short": Profile("short", 16, 5, 4, 3, 2, 1, 15),
    "long": Profile("long", 32, 60, 30, 20, 10, 3, 100),
}


def _profile() -> Profile:
    name = os.environ.get(PROFILE_VARIABLE, "short")
    if name not in PROFILES:
        raise pytest.UsageError(f"{PROFILE_VARIABLE}={name!r}: expected one of {list(PROFILES)}")
    return PROFILES[name]


def pytest_report_header() -> str:
    return f"v2mount reliability profile: {_profile().name}"


@pytest.fixture(scope="session")
def profile() -> Profile:
    return _profile()


# -- figures -------------------------------------------------------------------------


@dataclass
class Figure:
    suite: str
    case: str
    tried: int
    ok: int
    client_errors: int
    server_errors: int
    lost: int
    recovery_s: float | None = None
    notes: str = ""


class FigureBook:
    """The figures of one run, one row per measured case."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.rows: list[Figure] = []

    def add(self, figure: Figure) -> None:
        self.rows.append(figure)

    def add_tally(
        self,
        suite: str,
        case: str,
        tally: Tally,
        recovery_s: float | None = None,
        notes: str = "",
    ) -> None:
        self.add(
            Figure(
                suite,
                case,
                tally.sent,
                tally.ok,
                tally.in_range(400, 500),
                tally.in_range(500, 600),
                tally.lost,
                recovery_s,
                notes,
            )
        )

    def add_statuses(
        self, suite: str, case: str, statuses: Counter[int], lost: int = 0, notes: str = ""
    ) -> None:
        """A row from the statuses of every answer (``lost``: requests never answered)."""

        def count(low: int, high: int) -> int:
            return sum(n for status, n in statuses.items() if low <= status < high)

        tried = sum(statuses.values()) + lost
        self.add(
            Figure(suite, case, tried, statuses[200], count(400, 500), count(500, 600), lost,
                   None, notes)
        )  # fmt: skip

    def markdown(self) -> str:
        lines = [
            "| suite | case | tried | OK | 4xx | 5xx | never answered | recovery (s) | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in self.rows:
            recovery = "" if row.recovery_s is None else f"{row.recovery_s:.2f}"
            lines.append(
                f"| {row.suite} | {row.case} | {row.tried} | {row.ok} | {row.client_errors} "
                f"| {row.server_errors} | {row.lost} | {recovery} | {row.notes} |"
            )
        return "\n".join(lines)


_BOOK = pytest.StashKey[FigureBook]()


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config, profile: Profile) -> FigureBook:
    book = pytestconfig.stash.setdefault(_BOOK, FigureBook(profile))
    return book


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    book = config.stash.get(_BOOK, None)
    if book is None or not book.rows:
        return
    terminalreporter.write_sep("=", f"reliability figures ({book.profile.name} profile)")
    terminalreporter.write_line(book.markdown())
    target = os.environ.get(FIGURES_VARIABLE)
    if target:
        document = {"profile": asdict(book.profile), "rows": [asdict(r) for r in book.rows]}
        Path(target).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


# -- processes -----------------------------------------------------------------------


def is_spawned_worker(pid: int) -> bool:
    """A pool worker: a ``multiprocess`` spawn child (or forked from one), not the resource
    tracker, nor a pool's template process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            spawned = b"spawn_main" in cmdline.read()
        with open(f"/proc/{pid}/comm") as comm:
            return spawned and comm.read().strip() != TEMPLATE_NAME
    except OSError:
        return False


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (``VmRSS``) in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def arenas(pid: int) -> set[str]:
    """Shared-memory arenas a pool in process ``pid`` created (``v2mount-<pid>-*``)."""
    return {p.name for p in SHM.glob(f"v2mount-{pid}-*")} if SHM.is_dir() else set()


async def until(
    condition: Callable[[], bool], within: float, explain: Callable[[], str] = str
) -> float:
    """Seconds until ``condition()`` holds, polled; fails with ``explain()`` after ``within``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not after {within} s: {explain()}")
        await anyio.sleep(0.01)


class PoolWatch:
    """A worker pool seen from outside, through ``/proc`` and the models' load markers.

    The workers are the spawned children of ``parent``; a *loaded* one has left a marker
    named after its pid in ``markers`` (see ``reliability_models``).
    """

    def __init__(self, parent: int, markers: Path, size: int) -> None:
        self.parent = parent
        self.markers = markers
        self.size = size

    def processes(self) -> set[int]:
        return {p for p in descendants(self.parent) if is_spawned_worker(p)}

    def _marked(self, prefix: str) -> set[int]:
        """Live processes that left a marker ``<prefix><pid>``."""
        found = set()
        for marker in self.markers.iterdir():
            pid = marker.name.removeprefix(prefix)
            if marker.name.startswith(prefix) and pid.isdigit():
                fields = stat_fields(int(pid))
                # Alive, and the very process that wrote the marker (pids are reused).
                if fields and fields[0] != "Z" and fields[19] == marker.read_text():
                    found.add(int(pid))
        return found

    def loaded(self) -> set[int]:
        return self._marked("")

    def hanging(self) -> set[int]:
        """Live workers stuck in ``Faulty``'s ``hang`` action (killed by the hard timeout)."""
        return self._marked("hanging-")

    def settled(self) -> bool:
        """Whole, nothing hanging, and no worker process besides the loaded ones."""
        return not self.hanging() and self.whole() and self.processes() == self.loaded()

    async def wait_settled(self, within: float = 60) -> float:
        """Seconds until every stuck worker was killed and replaced (fails after ``within``)."""
        return await until(
            self.settled,
            within,
            lambda: (
                f"not settled: loaded {self.loaded()}, processes {self.processes()}, "
                f"hanging {self.hanging()}"
            ),
        )

    def whole(self) -> bool:
        return len(self.loaded()) == self.size

    async def wait_whole(self, within: float = 60) -> float:
        """Seconds until ``size`` loaded workers are alive (fails after ``within``)."""
        return await until(
            self.whole,
            within,
            lambda: f"the pool is not whole: loaded {self.loaded()}, processes {self.processes()}",
        )

    def kill_random(self, rng: random.Random, sig: int) -> int | None:
        """Send ``sig`` to a random live worker process (loaded or still loading)."""
        candidates = sorted(self.processes() | self.loaded())
        if not candidates:
            return None
        pid = rng.choice(candidates)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        return pid


@pytest.fixture(scope="session")
def reliability_models() -> ModuleType:
    """``reliability_models.py`` loaded by path (workers get it by file, as users' tests do)."""
    return load_module(HERE / "reliability_models.py", "v2mount_reliability_models")


# -- a real server -------------------------------------------------------------------


def write_model(repository: Path, name: str, **fields: Any) -> Path:
    """``repository/name/model-settings.json`` with ``fields``; returns the folder."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-settings.json").write_text(json.dumps({"name": name, **fields}))
    return folder


class Server:
    """``python -m v2mount`` on 127.0.0.1 in a subprocess, serving ``repository``.

    ``settings`` become ``V2MOUNT_*`` variables of the subprocess; its ``PYTHONPATH``
    holds this folder, so ``reliability_models.*`` implementations import.
    """

    def __init__(self, repository: Path, log: Path, settings: dict[str, Any]) -> None:
        self.repository = repository
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self._env = {**os.environ, "PYTHONPATH": path}
        self._env.update({f"V2MOUNT_{k.upper()}": str(v) for k, v in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> Server:
        command = [
            sys.executable, "-m", "v2mount", "--repository", str(self.repository),
            "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        with self._log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=self._env)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not become ready:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        return {p for p in descendants(self.pid) if is_spawned_worker(p)}

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def arenas(self) -> set[str]:
        return arenas(self.pid)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def close(self) -> None:
        """Kill the server and whatever it left behind (the tests check it left nothing)."""
        if self.process is None or self.process.poll() is not None:
            return  # exited: its descendants were checked (or were orphaned) by the test
        left = {pid: stat_fields(pid) for pid in descendants(self.pid)}
        self.process.kill()
        self.process.wait()
        for pid, fields in left.items():
            now = stat_fields(pid)
            # Only the very process seen above: a pid may have been reused since.
            if fields is not None and now is not None and now[19] == fields[19]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``launch(repository, **settings)``: a started ``Server``, killed at module end."""
    started: list[Server] = []

    def start(repository: Path, **settings: Any) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(repository, log, settings)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


# -- load ----------------------------------------------------------------------------

#: (kind, path, body): ``kind`` groups requests in the tallies.
Request = tuple[str, str, bytes]


def infer_body(x: float = 1.0, **parameters: Any) -> bytes:
    """An inference request for the reliability models' input ``x`` (one FP32)."""
    document: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}
    document["inputs"][0]["data"] = [x]
    if parameters:
        document["parameters"] = parameters
    return orjson.dumps(document)


@dataclass
class Tally:
    """What became of the requests of one kind."""

    sent: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retry_after: Counter[str] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    #: The server was not accepting connections (after shutdown began).
    refused: int = 0
    #: The connection closed without an answer.
    dropped: int = 0
    #: No answer within the client's timeout.
    hung: int = 0

    @property
    def lost(self) -> int:
        """Requests never answered."""
        return self.dropped + self.hung

    def in_range(self, low: int, high: int) -> int:
        return sum(n for status, n in self.statuses.items() if low <= status < high)

    def record(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            self.ok += 1
            return
        self.statuses[response.status_code] += 1
        try:
            error = orjson.loads(response.content)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            error = None
        if not isinstance(error, str) or not error:
            self.malformed.append(f"{response.status_code} {response.text[:200]!r}")
        else:
            shape = "".join("N" if c.isdigit() else c for c in error)
            self.errors[f"{response.status_code} {shape}"] += 1
        if response.status_code == 503 and "retry-after" in response.headers:
            self.retry_after[response.headers["retry-after"]] += 1

    def merge(self, other: Tally) -> None:
        for name in ("sent", "ok", "refused", "dropped", "hung"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.statuses += other.statuses
        self.errors += other.errors
        self.retry_after += other.retry_after
        self.malformed += other.malformed


def total(tallies: dict[str, Tally]) -> Tally:
    merged = Tally()
    for tally in tallies.values():
        merged.merge(tally)
    return merged


class Load:
    """Load generators against a server URL; every request has a deadline (a hang counts)."""

    def __init__(self, url: str, timeout: float, connections: int) -> None:
        self.url = url
        self.timeout = timeout
        self.connections = connections
        self.tallies: dict[str, Tally] = {}

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.connections, max_keepalive_connections=self.connections
        )
        return httpx.AsyncClient(base_url=self.url, timeout=None, limits=limits)

    async def send(self, client: httpx.AsyncClient, request: Request) -> None:
        kind, path, body = request
        tally = self.tallies.setdefault(kind, Tally())
        tally.sent += 1
        with anyio.move_on_after(self.timeout):
            try:
                response = await client.post(path, content=body)
            except httpx.ConnectError:
                tally.refused += 1
                await anyio.sleep(0.01)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                tally.dropped += 1
            else:
                tally.record(response)
            return
        tally.hung += 1

    async def closed_loop(
        self,
        make: Callable[[int], Request],
        concurrency: int,
        seconds: float,
        stop: anyio.Event | None = None,
    ) -> dict[str, Tally]:
        """``concurrency`` clients, each sending its next request when the last is answered."""
        deadline = time.monotonic() + seconds
        counter = iter(range(1 << 62))

        async def client_loop(client: httpx.AsyncClient) -> None:
            while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
                await self.send(client, make(next(counter)))

        async with self.client() as client, anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(client_loop, client)
        return self.tallies

    async def open_loop(
        self, make: Callable[[int], Request], rate: float, seconds: float
    ) -> dict[str, Tally]:
        """``rate`` requests a second, whatever the answers (an arrival process)."""
        start = time.monotonic()
        async with self.client() as client, anyio.create_task_group() as tg:
            for i in range(round(rate * seconds)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(self.send, client, make(i))
        return self.tallies


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """This module: ``harness.Load``, ``harness.PoolWatch``, ``harness.infer_body`` ..."""
    return sys.modules[__name__]
