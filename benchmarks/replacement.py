"""How fast a pool heals: a killed worker's replacement, spawned or forked from the template.

No HTTP: each figure watches ``WorkerPool`` itself.

- ``replace``: a pool of 2 serving one caller; SIGKILL one of its loaded workers and time
  until the pool has 2 loaded workers again (the victim gone); median, min and max over
  ``--kills`` kills, and how long ``start()`` took (until both workers had loaded). For
  the demo ``identity`` and ``linear`` models (``linear`` loads its weights from an
  ``.npz``), and the scikit-learn runtime serving ``examples/models/iris`` (``iris``,
  whose template preloads scikit-learn, and ``iris-bare``, the same model with nothing
  preloaded: its workers import scikit-learn in ``load``), with workers forked from the
  pool's template and with workers spawned (the fallback: a fresh interpreter that
  imports numpy and the model). The iris cases need ``model.joblib``: ``python
  examples/models/iris/train.py``.
- ``memory``: proportional set size (PSS) of this process and every process it started,
  with 3 models (``identity``, ``linear``, ``identity``) in pools of 2 (Linux); and with
  3 copies of ``iris`` and of ``iris-bare`` (when chosen with ``--models``).
- ``storm``: 16 concurrent callers on a pool of 2 (identity); every 0.5 s for 10 s,
  SIGKILL the worker that answered last (a serving one; no kill when none answered since
  the last kill); then the time from the last kill until the pool is whole again, and
  what became of the requests meanwhile (a caller that got an error waits 10 ms).

Run from the repository root:

    python -m benchmarks.replacement                  # both figures, template and spawn
    python -m benchmarks.replacement --kills 20
    python -m benchmarks.replacement --only storm --start template
    python -m benchmarks.replacement --only replace --models iris iris-bare

On a shared machine, a spawned replacement waits for a core as long as the rest of the
machine is busy: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

import v2mount.demo
from v2mount.demo.models import Identity, LinearClassifier
from v2mount.errors import V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.model import Model
from v2mount.pool import PoolConfig, WorkerPool
from v2mount.pool import _template as template_module
from v2mount.runtimes import SKLearnModel
from v2mount.types import InferenceRequest, Tensor

STARTS = ("template", "spawn")
SUPPORTED = template_module.template_supported
LINEAR_WEIGHTS = Path(v2mount.demo.__file__).parent / "linear" / "1" / "weights.npz"
IRIS = Path(__file__).resolve().parent.parent / "examples" / "models" / "iris" / "model.joblib"


class PidIdentity(Identity):
    """The demo identity model that also says which worker answered."""

    def predict(self, payload: InferenceRequest) -> dict[str, Any]:
        return {**super().predict(payload), "pid": np.array([os.getpid()])}


class BareSKLearnModel(SKLearnModel):
    """The scikit-learn runtime with nothing preloaded: its ``load`` imports it all."""

    preload = ()


def ignore(updates: list[MetricUpdate]) -> None:
    """The metrics sink: these models record none."""


MODELS: dict[str, Callable[[], Model]] = {
    "identity": lambda: PidIdentity(name="identity"),
    "linear": lambda: LinearClassifier(name="linear", parameters={"uri": str(LINEAR_WEIGHTS)}),
    "iris": lambda: SKLearnModel(name="iris", parameters={"uri": str(IRIS)}),
    "iris-bare": lambda: BareSKLearnModel(name="iris", parameters={"uri": str(IRIS)}),
}


def rows(n: int) -> InferenceRequest:
    return InferenceRequest([Tensor("x", "FP32", (n, 4), np.ones((n, 4), np.float32))])


def _never() -> bool:
    return False


def use_start(start: str) -> None:
    """``spawn`` forces the fallback a pool takes where no template can run."""
    template_module.template_supported = SUPPORTED if start == "template" else _never


def whole(pool: WorkerPool, size: int) -> bool:
    return pool.statistics().live_workers == size and len(pool.pids()) == size


async def wait_for(condition: Callable[[], bool], within: float = 120.0) -> float:
    """Seconds until ``condition()`` holds, polled every millisecond."""
    start = time.perf_counter()
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)
    return time.perf_counter() - start


async def replace(model: str, start: str, kills: int) -> tuple[float, list[float]]:
    """Seconds ``start()`` took, and from SIGKILL of a loaded worker to a whole pool
    again, once per kill."""
    use_start(start)
    pool = WorkerPool(MODELS[model](), PoolConfig(2, 64), metrics_sink=ignore)
    began = time.perf_counter()
    await pool.start()
    started = time.perf_counter() - began
    samples: list[float] = []
    done = anyio.Event()

    async def caller() -> None:  # the pool is serving while its workers are killed
        while not done.is_set():
            try:
                await pool.infer(rows(1))
            except V2MountError:
                await anyio.sleep(0.001)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(caller)
            for _ in range(kills):
                await wait_for(lambda: whole(pool, 2))
                await anyio.sleep(0.2)  # let the newcomer serve a little
                victim = random.choice(pool.pids())
                os.kill(victim, signal.SIGKILL)
                samples.append(await wait_for(lambda: whole(pool, 2) and victim not in pool.pids()))  # noqa: B023
            done.set()
    finally:
        await pool.stop()
    return started, samples


async def storm(start: str, seconds: float, every: float, concurrency: int) -> dict[str, Any]:
    """Kill the worker that answered last every ``every`` s; then time the healing."""
    use_start(start)
    pool = WorkerPool(MODELS["identity"](), PoolConfig(2, 256), metrics_sink=ignore)
    await pool.start()
    outcomes: Counter[str] = Counter()
    last_pid = 0
    stop = anyio.Event()

    async def caller() -> None:
        nonlocal last_pid
        while not stop.is_set():
            try:
                response = await pool.infer(rows(1))
            except V2MountError as exc:
                outcomes[type(exc).__name__] += 1
                await anyio.sleep(0.01)
            else:
                outcomes["ok"] += 1
                last_pid = int(response.outputs[1].data[0])

    try:
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(caller)
            await wait_for(lambda: whole(pool, 2) and last_pid != 0)
            end = time.perf_counter() + seconds
            victims: list[int] = []
            while True:
                if last_pid not in victims:  # else no worker served since the last kill
                    os.kill(last_pid, signal.SIGKILL)
                    victims.append(last_pid)
                last_kill = time.perf_counter()
                if last_kill + every > end:
                    break
                await anyio.sleep(every)
            await wait_for(lambda: whole(pool, 2) and victims[-1] not in pool.pids())
            healed = time.perf_counter() - last_kill
            stop.set()
    finally:
        await pool.stop()
    return {"kills": len(victims), "healed": healed, "outcomes": dict(outcomes)}


def pss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree(root: int) -> set[int]:
    """``root`` and every living process below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = {root}, {root}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


async def memory(start: str, names: tuple[str, ...]) -> tuple[float, int]:
    """PSS (MB) of the whole process tree with a pool of 2 per model started, and its
    processes."""
    use_start(start)
    pools = [WorkerPool(MODELS[name](), PoolConfig(2, 8), metrics_sink=ignore) for name in names]
    try:
        for pool in pools:
            await pool.start()
        processes = tree(os.getpid())
        return sum(pss_mb(pid) for pid in processes), len(processes)
    finally:
        for pool in pools:
            await pool.stop()


def describe(samples: list[float]) -> str:
    ms = [s * 1e3 for s in samples]
    return (
        f"median {statistics.median(ms):7.1f} ms  min {min(ms):7.1f}  max {max(ms):7.1f}"
        f"  ({len(ms)} kills)"
    )


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("v2mount").setLevel(logging.ERROR)  # one warning per kill otherwise
    print(f"{platform.python_version()} on {platform.system()}, {os.cpu_count()} cores")
    for start in args.start:
        if "replace" in args.only:
            for model in args.models:
                if model.startswith("iris") and not IRIS.is_file():
                    print(f"replace  {model}: no {IRIS}; python examples/models/iris/train.py")
                    continue
                started, samples = await replace(model, start, args.kills)
                print(
                    f"replace  {model:<9} {start:<8} {describe(samples)}"
                    f"  start {started * 1e3:,.0f} ms"
                )
                print(f"         load average {os.getloadavg()[0]:.2f}")
        if "memory" in args.only:
            trios = [("identity", "linear", "identity")]
            trios += [(name,) * 3 for name in ("iris", "iris-bare") if name in args.models]
            for names in trios:
                if names[0].startswith("iris") and not IRIS.is_file():
                    continue
                total, processes = await memory(start, names)
                print(
                    f"memory   {'3 demo' if len(set(names)) > 1 else '3 ' + names[0]:<16} "
                    f"{start:<8} PSS {total:7.1f} MB in {processes} processes"
                )
        if "storm" in args.only:
            result = await storm(start, args.storm_seconds, 0.5, 16)
            print(
                f"storm    identity {start:<8} whole {result['healed'] * 1e3:7.1f} ms after the "
                f"last of {result['kills']} kills; requests {result['outcomes']}"
            )
            print(f"         load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--storm-seconds", type=float, default=10.0)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("replace", "memory", "storm"),
        default=["replace", "memory", "storm"],
    )
    parser.add_argument("--start", nargs="+", choices=STARTS, default=list(STARTS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    anyio.run(main, parser.parse_args())
