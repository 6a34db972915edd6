"""Start, probe and stop the two servers, and read their process tree's CPU and memory.

v2mount runs from the current interpreter (``python -m uvicorn v2mount:app``); MLServer
runs from its own virtual environment, created once by ``ensure_mlserver_venv``. Both get
one BLAS thread per process and the same HTTP stack (uvicorn + httptools + uvloop), and
both have their access log off. Each server is the leader of a new process session, so
stopping it reaches its worker processes too.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

__all__ = [
    "RunningServer",
    "TreeStats",
    "ensure_mlserver_venv",
    "free_port",
    "http_request",
    "mlserver_requirements",
    "start_mlserver",
    "start_v2mount",
    "system_busy_s",
    "tree_pids",
    "tree_stats",
    "wait_for_quiet",
    "wait_ready",
    "write_mlserver_settings",
]

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"

#: One BLAS thread per process, so that "1 worker" means one core for both servers.
BLAS_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _installed(name: str) -> str:
    return metadata.version(name)


def mlserver_requirements() -> list[str]:
    """MLServer's venv: the release under test, plus what makes the match fair.

    ``uvloop==0.21.0``: with the uvloop 0.22+ that a fresh install pulls, MLServer 1.7.1's
    worker processes die at start. ``httptools`` (not a dependency of MLServer) gives it the
    same HTTP parser as v2mount; scikit-learn is pinned to ours so both load the same pickle.
    """
    return [
        "mlserver==1.7.1",
        "mlserver-sklearn==1.7.1",
        "uvloop==0.21.0",
        f"httptools=={_installed('httptools')}",
        f"scikit-learn=={_installed('scikit-learn')}",
    ]


def ensure_mlserver_venv(venv: Path, *, log: Path) -> Path:
    """Create (or reuse, when its requirements are unchanged) MLServer's venv; return its bin.

    Blocks while pip runs (about a minute the first time); pip's output goes to ``log``.
    The bin is absolute: servers start in their own working directories.
    """
    venv = venv.resolve()
    wanted = "\n".join(mlserver_requirements())
    marker = venv / "bench-requirements.txt"
    bin_dir = venv / "bin"
    if marker.exists() and marker.read_text() == wanted and (bin_dir / "mlserver").exists():
        return bin_dir
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        if not (bin_dir / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out)
        subprocess.run(
            [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *wanted.split("\n")],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    marker.write_text(wanted)
    return bin_dir


#: Ports this run has handed out: the kernel may offer a closed probe's port again, and two
#: servers (or a server's HTTP and gRPC ports) given the same one collide at start.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and that this run has not handed out yet."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class RunningServer:
    """A server process (and its session) started by this module."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    extra_ports: list[int] = field(default_factory=list)
    #: Where its gRPC server listens (v2mount: ``V2MOUNT_GRPC_PORT``; MLServer: always).
    grpc_port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 15.0) -> list[int]:
        """SIGTERM the server (its main process only, as a supervisor would), then clean up.

        Returns the pids of processes of its session that outlived the main process
        (they are then killed): a server should leave none.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        leftovers = session_pids(self.process.pid)
        if leftovers:
            time.sleep(1.0)  # a worker may still be on its way out
            leftovers = session_pids(self.process.pid)
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return leftovers


def session_pids(sid: int) -> list[int]:
    """Living processes of session ``sid`` (a server started with ``start_new_session``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _spawn(
    kind: str, command: list[str], env: Mapping[str, str], log: Path, port: int, cwd: Path
) -> RunningServer:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    return RunningServer(kind, port, process, log)


def _pythonpath(extra: Path) -> str:
    current = os.environ.get("PYTHONPATH")
    return f"{extra}{os.pathsep}{current}" if current else str(extra)


def start_v2mount(
    repository: Path, *, log: Path, env: Mapping[str, str] | None = None
) -> RunningServer:
    """``uvicorn v2mount:app`` on a free port with httptools, uvloop and no access log,
    and its gRPC server on another (as MLServer always runs one)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "v2mount:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    grpc_port = free_port()
    full_env = {
        **BLAS_ENV,
        "PYTHONPATH": _pythonpath(MODELS_DIR),
        "V2MOUNT_MODEL_REPOSITORY": str(repository),
        "V2MOUNT_GRPC_PORT": str(grpc_port),
        "V2MOUNT_GRPC_HOST": "127.0.0.1",
        **(env or {}),
    }
    server = _spawn("v2mount", command, full_env, log, port, repository)
    server.grpc_port = grpc_port
    return server


def write_mlserver_settings(repository: Path, parallel_workers: int) -> list[int]:
    """Write MLServer's ``settings.json`` (ports, workers, no access log); return the ports."""
    ports = [free_port() for _ in range(3)]
    settings = {
        "host": "127.0.0.1",
        "http_port": ports[0],
        "grpc_port": ports[1],
        "metrics_port": ports[2],
        "parallel_workers": parallel_workers,
        "debug": False,
        "metrics_dir": str(repository / ".metrics"),
        "environments_dir": str(repository / ".envs"),
    }
    (repository / "settings.json").write_text(json.dumps(settings, indent=2))
    return ports


def start_mlserver(repository: Path, bin_dir: Path, *, log: Path) -> RunningServer:
    """``mlserver start`` on the repository (its ``settings.json`` holds the ports)."""
    settings = json.loads((repository / "settings.json").read_text())
    command = [str(bin_dir / "mlserver"), "start", str(repository)]
    env = {**BLAS_ENV, "PYTHONPATH": _pythonpath(MODELS_DIR)}
    server = _spawn("mlserver", command, env, log, settings["http_port"], repository)
    server.extra_ports = [settings["grpc_port"], settings["metrics_port"]]
    server.grpc_port = settings["grpc_port"]
    return server


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP/1.1 request to 127.0.0.1; returns status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def wait_ready(server: RunningServer, models: list[str], timeout_s: float = 180.0) -> float:
    """Poll server and model readiness; return the seconds since start. Raises on time-out."""
    start = server.started_at
    paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.kind} exited ({server.process.returncode}); see {server.log}"
            )
        try:
            if all(http_request(server.port, "GET", p, timeout_s=5)[0] == 200 for p in paths):
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{server.kind} not ready after {timeout_s:.0f} s; see {server.log}")
        time.sleep(0.25)


# --- process tree statistics ----------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children = _children_map()
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


@dataclass(frozen=True)
class TreeStats:
    """CPU seconds (including reaped children) and memory of a process tree.

    ``main_cpu_s`` is the root process alone (the HTTP server); the rest is its workers.
    """

    processes: int
    cpu_s: float
    main_cpu_s: float
    rss_mb: float
    pss_mb: float


def tree_stats(root: int) -> TreeStats:
    cpu = main = rss = pss = 0.0
    pids = tree_pids(root)
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(v) for v in fields[11:15]) / _TICK  # utime stime cutime cstime
            if pid == root:
                main = (int(fields[11]) + int(fields[12])) / _TICK
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return TreeStats(len(pids), cpu, main, rss, pss)


def system_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``, no idle/iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def wait_for_quiet(limit: float = 0.15, window_s: float = 0.5, timeout_s: float = 60.0) -> float:
    """Wait until the machine is idle (< ``limit`` of one core busy over ``window_s``).

    Other work on a shared machine (a test suite, a build) would steal the 2 cores from
    the run. Returns the busy fraction last seen, which is above ``limit`` on time-out.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        before = system_busy_s()
        time.sleep(window_s)
        busy = (system_busy_s() - before) / window_s
        if busy < limit or time.monotonic() > deadline:
            return busy
