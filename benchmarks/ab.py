"""Two versions of v2mount side by side: ``python -m benchmarks.ab --before /path/to/checkout``.

``benchmarks.compare`` measures v2mount against MLServer; this measures a change. It
starts the same in-process setup twice — once with ``--before`` (another checkout of
v2mount, say ``git worktree add /tmp/before main``) first on ``PYTHONPATH``, once with
this checkout — and alternates every case between them (the order flips on each
repetition), so noise from the rest of a shared machine hits both alike. Cases: the
tiny model at concurrency 1, 16 and 64, and the 1M-element FP32 echo as JSON and with
the binary extension. Run ``python -m benchmarks.compare`` once first: it writes the
weights and payloads this reuses.

Prints one Markdown table: requests/s, p50 / p99 and server CPU per request of each
version, and the after ÷ before ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.compare import _load_bench_core
from benchmarks.loadgen import find_wrk, run_load
from benchmarks.scenarios import ModelSpec, Payload, Setup, write_payloads, write_repositories
from benchmarks.servers import (
    BENCH_DIR,
    MODELS_DIR,
    RunningServer,
    start_v2mount,
    tree_stats,
    wait_ready,
)

REPO = BENCH_DIR.parent

#: (label, model, payload, concurrency)
CASES = [
    ("tiny c=1", "tiny", "tiny", 1),
    ("tiny c=16", "tiny", "tiny", 16),
    ("tiny c=64", "tiny", "tiny", 64),
    ("echo 1M JSON c=1", "echo", "echo-json", 1),
    ("echo 1M binary c=1", "echo", "echo-binary", 1),
]


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float


def _measure(server: RunningServer, model: str, payload: Payload, c: int, seconds: float) -> Sample:
    url = f"{server.base_url}/v2/models/{model}/infer"
    run_load("wrk", url, payload.path, payload.headers, c, 1.0)
    before = tree_stats(server.process.pid)
    load = run_load("wrk", url, payload.path, payload.headers, c, seconds)
    after = tree_stats(server.process.pid)
    cpu = (after.cpu_s - before.cpu_s) / max(1, load.requests) * 1e3
    return Sample(load.rps, load.p50_ms, load.p99_ms, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated case-label prefixes")
    args = parser.parse_args()
    if find_wrk() is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = BENCH_DIR / ".work"
    weights = _load_bench_core().write_weights(work / "weights")
    payloads = write_payloads(work / "payloads")
    models = (ModelSpec("tiny", "TinyModel", "tiny"), ModelSpec("echo", "EchoModel", None))
    setup = Setup("ab-pw0", "A/B", 0, models, ())
    repo = write_repositories(setup, work / "repos", weights)["v2mount"]
    cases = [c for c in CASES if not args.only or c[0].startswith(tuple(args.only.split(",")))]
    servers: dict[str, RunningServer] = {}
    try:
        for label, root in (("before", args.before.resolve()), ("after", REPO)):
            env = {"PYTHONPATH": f"{MODELS_DIR}:{root}", "V2MOUNT_MODEL_PARALLEL_WORKERS": "0"}
            servers[label] = start_v2mount(repo, log=work / "logs" / f"ab-{label}.log", env=env)
        for server in servers.values():
            wait_ready(server, ["tiny", "echo"])
        samples: dict[tuple[str, str], list[Sample]] = {}
        for rep in range(args.reps):
            for label, model, payload, c in cases:
                order = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
                for which in order:
                    sample = _measure(servers[which], model, payloads[payload], c, args.duration)
                    samples.setdefault((label, which), []).append(sample)
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {label:20} {which:6} {sample.rps:8.1f} "
                        f"req/s p50 {sample.p50_ms:7.2f} p99 {sample.p99_ms:7.2f} ms "
                        f"CPU {sample.cpu_ms:.3f} ms/req",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()

    def med(label: str, which: str, field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in samples[(label, which)]))

    print(
        "\n| case | req/s before / after | ratio | p50 / p99 ms before | p50 / p99 ms after "
        "| CPU ms/req before / after | CPU ratio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, *_ in cases:
        rb, ra = med(label, "before", "rps"), med(label, "after", "rps")
        cb, ca = med(label, "before", "cpu_ms"), med(label, "after", "cpu_ms")
        print(
            f"| {label} | {rb:,.0f} / {ra:,.0f} | **{ra / rb:.2f}x** "
            f"| {med(label, 'before', 'p50_ms'):.2f} / {med(label, 'before', 'p99_ms'):.1f} "
            f"| {med(label, 'after', 'p50_ms'):.2f} / {med(label, 'after', 'p99_ms'):.1f} "
            f"| {cb:.3f} / {ca:.3f} | {ca / cb:.2f}x |"
        )
    print(f"\nMedians of {args.reps} interleaved runs of {args.duration:g} s per case and version.")


if __name__ == "__main__":
    main()
