"""Benchmark v2mount against MLServer 1.7.1, side by side: ``python -m benchmarks.compare``.

One run trains the tiny model (once), writes both servers' repositories with the same
model code and weights, stands each setup's two servers up together, and measures
every case against v2mount and MLServer in turn (the order flips on each repetition).
Results go to ``benchmarks/results/`` as Markdown, JSON and a PNG chart. ``--quick``
takes a few minutes; the default run about twenty. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from benchmarks import report
from benchmarks.grpc_loadgen import METHOD, run_grpc
from benchmarks.loadgen import LoadResult, find_wrk, run_load
from benchmarks.scenarios import (
    Case,
    Payload,
    Setup,
    all_setups,
    write_payloads,
    write_repositories,
)
from benchmarks.servers import (
    BENCH_DIR,
    MODELS_DIR,
    RunningServer,
    TreeStats,
    ensure_mlserver_venv,
    http_request,
    start_mlserver,
    start_v2mount,
    system_busy_s,
    tree_stats,
    wait_for_quiet,
    wait_ready,
    write_mlserver_settings,
)

__all__ = ["Run", "main"]

SERVERS = ("v2mount", "mlserver")


@dataclass(frozen=True)
class Run:
    """One measured run of one case against one server."""

    server: str
    case: str
    rep: int
    load: LoadResult
    server_cpu_s: float
    #: The server's main process alone (HTTP, codecs, dispatch); the rest is its workers.
    server_main_cpu_s: float
    #: CPU the rest of the machine used meanwhile (other processes, the idle twin server).
    other_cpu_s: float

    def to_dict(self) -> dict[str, object]:
        return {
            "server": self.server,
            "case": self.case,
            "rep": self.rep,
            "server_cpu_s": self.server_cpu_s,
            "server_main_cpu_s": self.server_main_cpu_s,
            "other_cpu_s": self.other_cpu_s,
            **self.load.to_dict(),
        }


@dataclass
class Context:
    args: argparse.Namespace
    tool: str
    work: Path
    payloads: dict[str, Payload]
    weights: dict[str, Path]
    mlserver_bin: Path | None
    runs: list[Run] = field(default_factory=list)
    memory: dict[str, dict[str, TreeStats]] = field(default_factory=dict)
    startup_s: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Runs that began while other processes kept more than 15 % of a core busy.
    busy_starts: int = 0


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _load_bench_core() -> ModuleType:
    """Import ``models/bench_core.py`` by path (the folder is the servers' PYTHONPATH)."""
    spec = importlib.util.spec_from_file_location("bench_core", MODELS_DIR / "bench_core.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_wrk(allow_install: bool) -> str | None:
    """``wrk``'s path; installs Debian's package when absent, allowed, and we are root."""
    found = find_wrk()
    if found or not allow_install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    _log("wrk not found: apt-get install -y wrk")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
    subprocess.run(["apt-get", "update"], **quiet)  # type: ignore[call-overload]
    subprocess.run(["apt-get", "install", "-y", "wrk"], **quiet)  # type: ignore[call-overload]
    return find_wrk()


# --- checking answers -------------------------------------------------------------------


def _outputs(headers: dict[str, str], body: bytes) -> dict[str, list[float]]:
    """Output name -> flat values (JSON), or -> [byte size] for binary outputs."""
    header_length = headers.get("inference-header-content-length")
    document = json.loads(body[: int(header_length)] if header_length else body)
    outputs = {}
    for output in document["outputs"]:
        if "data" in output:
            data = output["data"]
            while data and isinstance(data[0], list):
                data = [v for row in data for v in row]
            outputs[output["name"]] = data
        else:
            outputs[output["name"]] = [output["parameters"]["binary_data_size"]]
    return outputs


def _grpc_outputs(port: int, body: bytes) -> dict[str, list[float]]:
    """Send one serialised ModelInferRequest; output name -> flat values."""
    import grpc
    import numpy as np

    from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        answer = channel.unary_unary(METHOD)(body, timeout=60)
    response = pb.ModelInferResponse.FromString(answer)
    dtypes = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}
    return {
        output.name: np.frombuffer(
            response.raw_output_contents[index], dtypes[output.datatype]
        ).tolist()
        for index, output in enumerate(response.outputs)
    }


def check_answers(ctx: Context, setup: Setup, servers: dict[str, RunningServer]) -> None:
    """Send each case's body once to each server: 200 and the same predictions, or raise."""
    for case in setup.cases:
        payload = ctx.payloads[case.payload]
        body = payload.path.read_bytes()
        answers = {}
        for kind in case.servers:
            if kind not in servers:
                continue
            if case.protocol == "grpc":
                port = servers[kind].grpc_port
                assert port is not None
                answers[kind] = _grpc_outputs(port, body)
                continue
            status, headers, answer = http_request(
                servers[kind].port,
                "POST",
                f"/v2/models/{case.model}/infer",
                body,
                payload.headers,
            )
            if status != 200:
                raise RuntimeError(f"{kind} {case.key}: HTTP {status}: {answer[:300]!r}")
            answers[kind] = _outputs(headers, answer)
        if case.model == "echo" or len(answers) < 2:
            continue
        first, second = answers.values()
        for name, values in first.items():
            other = second.get(name)
            if (
                other is None
                or len(other) != len(values)
                or any(
                    abs(a - b) > 1e-3 * max(1.0, abs(a)) for a, b in zip(values, other, strict=True)
                )
            ):
                raise RuntimeError(f"{case.key}: servers disagree on {name!r}: {values} / {other}")


# --- running ----------------------------------------------------------------------------


def _profile(ctx: Context, server: RunningServer, case: Case, payload: Payload) -> None:
    """Record a py-spy profile of the v2mount process tree during one extra run."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = ctx.args.out / f"profile-{case.key}.txt"
    raw = ctx.work / f"profile-{case.key}.raw"
    seconds = max(3, round(ctx.args.duration))
    command = [
        py_spy,
        "record",
        "--pid",
        str(server.process.pid),
        "--subprocesses",
        "--rate",
        "250",
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
    ]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    _load(ctx, server, case, seconds - 1)
    _, errors = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        ctx.notes.append(f"py-spy failed on {case.key}: {errors.decode()[-300:]}")
        return
    out.write_text(report.summarise_profile(raw.read_text(), title=f"v2mount, {case.key}"))
    _log(f"profile of {case.key} written to {out}")


def _load(ctx: Context, server: RunningServer, case: Case, duration: float) -> LoadResult:
    payload = ctx.payloads[case.payload]
    if case.protocol == "grpc":
        target = f"127.0.0.1:{server.grpc_port}"
        return run_grpc(target, payload.path, case.concurrency, duration)
    url = f"{server.base_url}/v2/models/{case.model}/infer"
    return run_load(ctx.tool, url, payload.path, payload.headers, case.concurrency, duration)


def measure(ctx: Context, server: RunningServer, case: Case, rep: int) -> Run:
    duration = ctx.args.duration
    if case.model == "echo":
        duration = max(duration, 5.0)
    if wait_for_quiet(timeout_s=ctx.args.quiet_timeout) > 0.15:
        ctx.busy_starts += 1
    if ctx.args.warmup > 0:
        _load(ctx, server, case, ctx.args.warmup)
    before, busy_before = tree_stats(server.process.pid), system_busy_s()
    load = _load(ctx, server, case, duration)
    after, busy_after = tree_stats(server.process.pid), system_busy_s()
    server_cpu = after.cpu_s - before.cpu_s
    other = max(0.0, busy_after - busy_before - server_cpu - load.loadgen_cpu_s)
    main_cpu = after.main_cpu_s - before.main_cpu_s
    run = Run(server.kind, case.key, rep, load, server_cpu, main_cpu, other)
    _log(
        f"  {server.kind:8} {case.key:18} {load.rps:9.1f} req/s  p50 {load.p50_ms:8.2f}  "
        f"p99 {load.p99_ms:8.2f} ms  err {load.errors}  server CPU "
        f"{1e3 * run.server_cpu_s / max(1, load.requests):.3f} ms/req "
        f"(main {1e3 * main_cpu / max(1, load.requests):.3f})  "
        f"loadgen CPU {100 * load.loadgen_cpu_s / load.duration_s:.0f} %  "
        f"other CPU {100 * other / load.duration_s:.0f} %"
    )
    return run


def run_setup(ctx: Context, setup: Setup) -> None:
    _log(f"setup {setup.key}: {setup.title}")
    repos = write_repositories(setup, ctx.work / "repos", ctx.weights)
    servers: dict[str, RunningServer] = {}
    logs = ctx.work / "logs"
    try:
        if "v2mount" in ctx.args.servers:
            servers["v2mount"] = start_v2mount(
                repos["v2mount"],
                log=logs / f"{setup.key}-v2mount.log",
                env={
                    "V2MOUNT_MODEL_PARALLEL_WORKERS": str(setup.parallel_workers),
                    **dict(setup.v2mount_env),
                },
            )
        if "mlserver" in ctx.args.servers:
            assert ctx.mlserver_bin is not None
            write_mlserver_settings(repos["mlserver"], setup.parallel_workers)
            servers["mlserver"] = start_mlserver(
                repos["mlserver"], ctx.mlserver_bin, log=logs / f"{setup.key}-mlserver.log"
            )
        models = [spec.name for spec in setup.models]
        for kind, server in servers.items():
            ctx.startup_s.setdefault(setup.key, {})[kind] = wait_ready(server, models)
        check_answers(ctx, setup, servers)
        if setup.measure_memory:
            measure_memory(ctx, setup, servers)
        for rep in range(ctx.args.reps):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for case in setup.cases:
                for kind in order:
                    if kind in case.servers:
                        ctx.runs.append(measure(ctx, servers[kind], case, rep))
        for case in setup.cases:
            if case.key in ctx.args.profile and "v2mount" in servers:
                _profile(ctx, servers["v2mount"], case, ctx.payloads[case.payload])
    finally:
        for kind, server in servers.items():
            leftovers = server.stop()
            if leftovers:
                ctx.notes.append(
                    f"{kind} left {len(leftovers)} process(es) running after SIGTERM "
                    f"in setup {setup.key} (killed)"
                )


def measure_memory(ctx: Context, setup: Setup, servers: dict[str, RunningServer]) -> None:
    """Warm every model (so lazily started workers are up), idle 3 s, read the trees."""
    body = ctx.payloads["tiny"].path.read_bytes()
    for server in servers.values():
        for spec in setup.models:
            for _ in range(8):
                http_request(
                    server.port,
                    "POST",
                    f"/v2/models/{spec.name}/infer",
                    body,
                    ctx.payloads["tiny"].headers,
                )
    time.sleep(3)
    for kind, server in servers.items():
        stats = tree_stats(server.process.pid)
        ctx.memory.setdefault(setup.key, {})[kind] = stats
        _log(
            f"  {kind:8} {stats.processes} processes, RSS {stats.rss_mb:.0f} MB, "
            f"PSS {stats.pss_mb:.0f} MB"
        )


# --- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, one repetition (a few minutes)"
    )
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of discarded load before each run")
    parser.add_argument("--reps", type=int, help="repetitions of every case (order alternates)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated setup-key prefixes (tiny,heavy,batch,echo,grpc,memory)",
    )
    parser.add_argument(
        "--servers", default="v2mount,mlserver", help="comma-separated subset of v2mount,mlserver"
    )
    parser.add_argument(
        "--loadgen",
        default="auto",
        choices=("auto", "wrk", "python"),
        help="auto = wrk (installed with apt-get when absent), else python",
    )
    parser.add_argument(
        "--profile", default="", help="comma-separated case keys to profile in v2mount with py-spy"
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=20.0,
        help="longest wait for other processes to go idle before a run (s)",
    )
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--name", help="file stem of the results (default: results / quick)")
    parser.add_argument("--mlserver-venv", type=Path, default=BENCH_DIR / ".venv-mlserver")
    args = parser.parse_args(argv)
    defaults = (3.0, 1.0, 1) if args.quick else (10.0, 2.0, 2)
    args.duration = args.duration or defaults[0]
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    args.reps = args.reps or defaults[2]
    args.name = args.name or ("quick" if args.quick else "results")
    args.servers = [s for s in args.servers.split(",") if s]
    if not set(args.servers) <= set(SERVERS) or not args.servers:
        parser.error(f"--servers must name some of {', '.join(SERVERS)}")
    args.only = [s for s in args.only.split(",") if s]
    args.profile = [s for s in args.profile.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    work: Path = args.work
    args.out.mkdir(parents=True, exist_ok=True)
    tool = "python" if args.loadgen == "python" else ensure_wrk(args.loadgen == "auto")
    if tool is None:
        if args.loadgen == "wrk":
            sys.exit("wrk not found; install it (apt-get install wrk) or use --loadgen python")
        tool = "python"
        _log("wrk unavailable: falling back to the asyncio client (it uses more CPU)")
    weights = _load_bench_core().write_weights(work / "weights")
    payloads = write_payloads(work / "payloads")
    mlserver_bin = None
    if "mlserver" in args.servers:
        _log(f"MLServer venv: {args.mlserver_venv}")
        mlserver_bin = ensure_mlserver_venv(args.mlserver_venv, log=work / "logs" / "pip.log")
    ctx = Context(args, tool, work, payloads, weights, mlserver_bin)
    machine = report.machine_info(mlserver_bin, tool)
    setups = [s for s in all_setups() if not args.only or s.key.startswith(tuple(args.only))]
    for setup in setups:
        run_setup(ctx, setup)
    elapsed = time.monotonic() - started
    if any(case.protocol == "grpc" for setup in setups for case in setup.cases):
        ctx.notes.append(
            "gRPC cases were driven by benchmarks.grpc_loadgen (grpc.aio, one HTTP/2 "
            "connection), not wrk; its CPU is in the load-gen column"
        )
    if ctx.busy_starts:
        ctx.notes.append(
            f"{ctx.busy_starts} of {len(ctx.runs)} runs started while other processes kept more "
            f"than 15 % of a core busy (after waiting up to {args.quiet_timeout:g} s for quiet); "
            "see the other-CPU column"
        )
    config = {
        "mode": "quick" if args.quick else "full",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "reps": args.reps,
        "loadgen": "wrk -t1" if tool != "python" else "asyncio client (benchmarks.loadgen)",
        "elapsed_s": round(elapsed),
        "command": "python -m benchmarks.compare "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    at_end = report.machine_info(None, "python")["v2mount"]
    if at_end != machine["v2mount"]:
        ctx.notes.append(
            f"v2mount changed during the run: {machine['v2mount']} at the start, {at_end} "
            "at the end; the servers started after the change ran the new code"
        )
    paths = report.write(
        args.out,
        args.name,
        setups=setups,
        runs=[r.to_dict() for r in ctx.runs],
        memory={k: {s: vars(t) for s, t in v.items()} for k, v in ctx.memory.items()},
        startup=ctx.startup_s,
        machine=machine,
        config=config,
        notes=ctx.notes,
    )
    _log(f"done in {elapsed / 60:.1f} min: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
