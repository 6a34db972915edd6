"""Turn a run's measurements into ``<name>.md``, ``<name>.json`` and ``<name>.png``.

Figures per case are means over the repetitions (requests/s and percentiles); server CPU
per request is total server-tree CPU over total requests; the load generator's CPU is
shown as a share of one core, so a reader can judge whether it was the bottleneck.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.scenarios import Case, Setup

__all__ = ["aggregate", "machine_info", "summarise_profile", "write"]

V2MOUNT_SIDE = (
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "anyio",
    "multiprocess",
    "orjson",
    "pydantic",
    "numpy",
    "scikit-learn",
)
MLSERVER_SIDE = (
    "mlserver",
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "orjson",
    "pydantic",
    "numpy",
    "scikit-learn",
)

Stats = dict[str, float]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def machine_info(mlserver_bin: Path | None, tool: str) -> dict[str, Any]:
    """Cores, CPU, memory, OS, Python and the package versions of both sides."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    try:
        import v2mount

        v2mount_version = str(getattr(v2mount, "__version__", "?"))
    except ImportError:
        v2mount_version = "not importable"
    dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--", "v2mount") else ""
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024**2, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "v2mount": f"{v2mount_version} @ {_git('rev-parse', '--short', 'HEAD')}{dirty}",
        "v2mount_side": {name: _version(name) for name in V2MOUNT_SIDE},
        "loadgen": tool,
    }
    if tool != "python":
        done = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        info["loadgen"] = (done.stdout or done.stderr).splitlines()[0].split(" [")[0]
    if mlserver_bin is not None:
        code = (
            "import json, sys; from importlib import metadata as m; "
            "print(json.dumps({'python': sys.version.split()[0], **{n: m.version(n) for n in "
            + repr(list(MLSERVER_SIDE))
            + "}}))"
        )
        done = subprocess.run(
            [str(mlserver_bin / "python"), "-c", code], capture_output=True, text=True, check=False
        )
        info["mlserver_side"] = json.loads(done.stdout) if done.returncode == 0 else {}
    return info


def aggregate(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Stats]:
    """(case, server) -> mean figures over repetitions, plus totals."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[(run["case"], run["server"])].append(run)
    result = {}
    for key, group in grouped.items():
        n = len(group)
        requests = sum(r["requests"] for r in group)
        duration = sum(r["duration_s"] for r in group)
        result[key] = {
            "rps": sum(r["rps"] for r in group) / n,
            "rps_min": min(r["rps"] for r in group),
            "rps_max": max(r["rps"] for r in group),
            "p50": sum(r["p50_ms"] for r in group) / n,
            "p90": sum(r["p90_ms"] for r in group) / n,
            "p99": sum(r["p99_ms"] for r in group) / n,
            "mean": sum(r["mean_ms"] for r in group) / n,
            "errors": sum(r["errors"] for r in group),
            "requests": requests,
            "cpu_ms": 1e3 * sum(r["server_cpu_s"] for r in group) / max(1, requests),
            "main_ms": 1e3 * sum(r["server_main_cpu_s"] for r in group) / max(1, requests),
            "loadgen_pct": 100 * sum(r["loadgen_cpu_s"] for r in group) / max(1e-9, duration),
            "loadgen_us": 1e6 * sum(r["loadgen_cpu_s"] for r in group) / max(1, requests),
            "other_pct": 100 * sum(r["other_cpu_s"] for r in group) / max(1e-9, duration),
            "reps": n,
        }
    return result


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _lat(stats: Stats | None) -> str:
    if stats is None:
        return "-"
    return f"{_fmt(stats['p50'])} / {_fmt(stats['p90'])} / {_fmt(stats['p99'])}"


def _cpu(stats: Stats | None) -> str:
    """Total server CPU per request, with the main process's share when workers took some."""
    if stats is None:
        return "-"
    total, main = stats["cpu_ms"], stats["main_ms"]
    return _fmt(total) if main > 0.95 * total else f"{_fmt(total)} ({_fmt(main)})"


def _get(stats: dict[str, float] | None, key: str) -> float | None:
    return None if stats is None else stats[key]


def _baseline(case: Case, agg: dict[tuple[str, str], Stats]) -> Stats | None:
    return agg.get((case.baseline or case.key, "mlserver"))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _r(value: float | None) -> str:
    return "-" if value is None else f"**{value:.2f}x**"


def _results_table(setups: Sequence[Setup], agg: dict[tuple[str, str], Stats]) -> list[str]:
    lines = [
        "| scenario | case | v2mount req/s | MLServer req/s | ratio | "
        "v2mount p50 / p90 / p99 ms | MLServer p50 / p90 / p99 ms | "
        "server CPU ms/req (v2mount / MLServer) | errors | load-gen CPU | other CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setup in setups:
        for case in setup.cases:
            ours = agg.get((case.key, "v2mount"))
            theirs = _baseline(case, agg)
            ratio = _ratio(_get(ours, "rps"), _get(theirs, "rps"))
            cpu = " / ".join(_cpu(s) for s in (ours, theirs))
            errors = " / ".join(str(int(s["errors"])) if s else "-" for s in (ours, theirs))
            loadgen = " / ".join(f"{s['loadgen_pct']:.0f} %" if s else "-" for s in (ours, theirs))
            other = " / ".join(f"{s['other_pct']:.0f} %" if s else "-" for s in (ours, theirs))
            lines.append(
                f"| {case.scenario} | {case.label} | {_fmt(ours['rps']) if ours else '-'} | "
                f"{_fmt(theirs['rps']) if theirs else '-'} | {_r(ratio)} | {_lat(ours)} | "
                f"{_lat(theirs)} | {cpu} | {errors} | {loadgen} | {other} |"
            )
    return lines


def _summary_table(
    setups: Sequence[Setup],
    agg: dict[tuple[str, str], Stats],
    memory: dict[str, dict[str, dict[str, float]]],
) -> list[str]:
    """A short table for the README: requests/s and ratio per case, then memory."""
    lines = [
        "| case | v2mount | MLServer 1.7.1 | v2mount / MLServer |",
        "| --- | ---: | ---: | ---: |",
    ]
    for setup in setups:
        for case in setup.cases:
            ours, theirs = agg.get((case.key, "v2mount")), _baseline(case, agg)
            if ours is None or theirs is None:
                continue
            ratio = _ratio(ours["rps"], theirs["rps"])
            lines.append(
                f"| {case.scenario[2:]}: {case.label} | {_fmt(ours['rps'])} req/s | "
                f"{_fmt(theirs['rps'])} req/s | {_r(ratio)} |"
            )
    for setup in setups:
        sizes = memory.get(setup.key, {})
        if "v2mount" in sizes and "mlserver" in sizes:
            ours_mb, theirs_mb = sizes["v2mount"]["pss_mb"], sizes["mlserver"]["pss_mb"]
            lines.append(
                f"| memory (PSS), {setup.title} | {ours_mb:.0f} MB | {theirs_mb:.0f} MB | "
                f"{_r(_ratio(ours_mb, theirs_mb))} |"
            )
    return lines


def _in_process_targets(
    agg: dict[tuple[str, str], Stats],
) -> list[tuple[str, str, str, bool | None]]:
    """The in-process hot path's targets (issue 14), from the tiny-pw0 cases."""
    cases = [c for c in ("tiny-pw0-c1", "tiny-pw0-c16", "tiny-pw0-c64") if (c, "v2mount") in agg]
    if not cases:
        return []
    ours = {c: agg[(c, "v2mount")] for c in cases}
    theirs = {c: agg.get((c, "mlserver")) for c in cases}
    rows: list[tuple[str, str, str, bool | None]] = []
    ratios = {c: _ratio(ours[c]["rps"], (theirs[c] or {}).get("rps")) for c in cases}
    if all(r is not None for r in ratios.values()):
        rows.append(
            (
                "tiny model in-process ≥ 2x MLServer at c = 1, 16, 64 (stretch 2.5x)",
                " / ".join(f"{ratios[c]:.2f}x" for c in cases),
                "1x",
                min(r for r in ratios.values() if r is not None) >= 2,
            )
        )
    rows.append(
        (
            "server CPU per tiny request in-process ≤ 0.45 ms",
            " / ".join(f"{ours[c]['cpu_ms']:.2f}" for c in cases),
            " / ".join("-" if t is None else f"{t['cpu_ms']:.2f}" for t in theirs.values()),
            max(ours[c]["cpu_ms"] for c in cases) <= 0.45,
        )
    )
    if "tiny-pw0-c64" in ours:
        ours64, theirs64 = ours["tiny-pw0-c64"], theirs["tiny-pw0-c64"]
        rows.append(
            (
                "p99 ≤ 3x p50 at c = 64 in-process",
                f"{ours64['p99']:.1f} / {ours64['p50']:.1f} ms = "
                f"{ours64['p99'] / ours64['p50']:.1f}x",
                "-"
                if theirs64 is None
                else f"{theirs64['p99']:.1f} / {theirs64['p50']:.1f} ms = "
                f"{theirs64['p99'] / theirs64['p50']:.1f}x",
                ours64["p99"] <= 3 * ours64["p50"],
            )
        )
    return rows


def _targets(agg: dict[tuple[str, str], Stats]) -> list[tuple[str, str, str, bool | None]]:
    """(target, v2mount figure, MLServer figure, met?) for each target of issue 8."""

    def rps(case: str, server: str) -> float | None:
        stats = agg.get((case, server))
        return stats["rps"] if stats else None

    def mark(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    rows: list[tuple[str, str, str, bool | None]] = []
    tiny = [
        (k, _ratio(rps(k, "v2mount"), rps(k, "mlserver")))
        for k in sorted({c for c, _ in agg if c.startswith("tiny-")})
    ]
    known = [r for _, r in tiny if r is not None]
    if known:
        worst = min(tiny, key=lambda kv: kv[1] if kv[1] is not None else 1e9)
        rows.append(
            (
                "tiny model throughput ≥ 2x MLServer at every concurrency, in-process and pool",
                f"lowest ratio {mark(worst[1])} ({worst[0]})",
                "1x",
                min(known) >= 2,
            )
        )
    scale = {s: _ratio(rps("heavy-pw2", s), rps("heavy-pw1", s)) for s in ("v2mount", "mlserver")}
    if scale["v2mount"] is not None:
        rows.append(
            (
                "CPU-heavy scaling 1 → 2 workers ≥ 1.8x",
                mark(scale["v2mount"]),
                mark(scale["mlserver"]),
                scale["v2mount"] >= 1.8,
            )
        )
    for workers in (0, 2):
        json_case = f"echo-pw{workers}-json"
        ours, theirs = agg.get((json_case, "v2mount")), agg.get((json_case, "mlserver"))
        if ours and theirs:
            speedup = theirs["mean"] / ours["mean"]
            binary = agg.get((f"echo-pw{workers}-binary", "v2mount"))
            extra = f"; binary {theirs['mean'] / binary['mean']:.1f}x" if binary else ""
            where = "in-process" if workers == 0 else "pool of 2"
            rows.append(
                (
                    f"1M-element JSON round trip ≥ 3x faster ({where})",
                    f"{ours['mean']:.0f} ms, {speedup:.2f}x faster{extra}",
                    f"{theirs['mean']:.0f} ms",
                    speedup >= 3,
                )
            )
    gains = {s: _ratio(rps("batch-on", s), rps("batch-off", s)) for s in ("v2mount", "mlserver")}
    on_v, on_m = agg.get(("batch-on", "v2mount")), agg.get(("batch-on", "mlserver"))
    if gains["v2mount"] is not None and gains["mlserver"] is not None and on_v and on_m:
        rows.append(
            (
                "batching gains ≥ MLServer's gain, with a lower p99",
                f"gain {mark(gains['v2mount'])}, p99 {on_v['p99']:.1f} ms",
                f"gain {mark(gains['mlserver'])}, p99 {on_m['p99']:.1f} ms",
                gains["v2mount"] >= gains["mlserver"] and on_v["p99"] < on_m["p99"],
            )
        )
    return rows


def _machine_lines(machine: dict[str, Any], config: dict[str, Any]) -> list[str]:
    ours = ", ".join(f"{k} {v}" for k, v in machine["v2mount_side"].items())
    mls = machine.get("mlserver_side", {})
    theirs = ", ".join(f"{k} {v}" for k, v in mls.items() if k != "python")
    return [
        f"- **Machine**: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GB, "
        f"{machine['os']}. The {machine['cores']} cores are *shared* by the server, its "
        "worker processes and the load generator (no CPU pinning): a pool of 2 workers "
        "competes with the main process and the load generator, so scaling figures are "
        "lower bounds of what 2 free cores would show.",
        f"- **v2mount** {machine['v2mount']} on Python {machine['python']}: {ours}.",
        f"- **MLServer** on Python {mls.get('python', '?')}: {theirs} (own venv; uvloop pinned "
        "to 0.21.0, httptools added, scikit-learn pinned to ours).",
        "- **Servers**: uvicorn with httptools and uvloop for both, access log off, one BLAS "
        "thread per process (`OPENBLAS_NUM_THREADS=1`).",
        f"- **Load**: {machine['loadgen']} (one thread), closed loop with fixed concurrency; "
        f"{config['duration_s']:g} s per run after {config['warmup_s']:g} s of warm-up, "
        f"{config['reps']} repetition(s) per case, servers in alternating order. "
        f"Mode {config['mode']}, {config['date']}, {config['elapsed_s'] / 60:.0f} min in all.",
        f"- **Command**: `{config['command']}`",
    ]


def _markdown(
    setups: Sequence[Setup],
    agg: dict[tuple[str, str], Stats],
    memory: dict[str, dict[str, dict[str, float]]],
    startup: dict[str, dict[str, float]],
    machine: dict[str, Any],
    config: dict[str, Any],
    notes: Sequence[str],
    chart: str,
) -> str:
    lines = ["# v2mount vs MLServer 1.7.1", "", *_machine_lines(machine, config), ""]
    lines += ["## Summary", "", *_summary_table(setups, agg, memory), ""]
    lines += [
        "## Throughput and latency",
        "",
        "Ratio = v2mount req/s ÷ MLServer req/s (at concurrency 1 it is also the latency ratio).",
        "",
    ]
    lines += [*_results_table(setups, agg), ""]
    lines += [
        "Server CPU is the user + system time of the server's whole process tree per "
        "request; in brackets, the main (HTTP) process's part when workers did the rest. "
        "Load-gen CPU and other CPU (every other process on the machine, "
        "including the idle twin server) are in % of one core (v2mount run / "
        "MLServer run).",
        "",
    ]
    targets = _targets(agg)
    if targets:
        lines += [
            "## Targets (issue 8)",
            "",
            "| target | v2mount | MLServer | met? |",
            "| --- | --- | --- | --- |",
        ]
        for name, ours, theirs, met in targets:
            lines.append(f"| {name} | {ours} | {theirs} | {'yes' if met else '**no**'} |")
        lines.append("")
    hot_path = _in_process_targets(agg)
    if hot_path:
        lines += [
            "## Targets (issue 14: the in-process hot path)",
            "",
            "| target | v2mount (c = 1 / 16 / 64) | MLServer | met? |",
            "| --- | --- | --- | --- |",
        ]
        for name, ours, theirs, met in hot_path:
            lines.append(f"| {name} | {ours} | {theirs} | {'yes' if met else '**no**'} |")
        lines.append("")
    if memory:
        lines += [
            "## Memory at idle, 3 tiny models loaded",
            "",
            "| setting | v2mount processes | v2mount RSS / PSS MB | MLServer processes | "
            "MLServer RSS / PSS MB | PSS ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for setup in setups:
            sizes = memory.get(setup.key)
            if not sizes:
                continue
            our_size, their_size = sizes.get("v2mount"), sizes.get("mlserver")

            def cell(s: dict[str, float] | None) -> tuple[str, str]:
                if s is None:
                    return "-", "-"
                return str(int(s["processes"])), f"{s['rss_mb']:.0f} / {s['pss_mb']:.0f}"

            ratio = _ratio(_get(our_size, "pss_mb"), _get(their_size, "pss_mb"))
            lines.append(
                f"| {setup.title} | {' | '.join(cell(our_size))} | {' | '.join(cell(their_size))} "
                f"| {'-' if ratio is None else f'{ratio:.2f}x'} |"
            )
        lines += [
            "",
            "PSS (proportional set size) splits shared pages between the processes "
            "that share them, so it adds up across a process tree; RSS counts them in "
            "every process.",
            "",
        ]
    if startup:
        lines += [
            "## Time to ready (s)",
            "",
            "| setup | v2mount | MLServer |",
            "| --- | ---: | ---: |",
        ]
        for setup in setups:
            seconds = startup.get(setup.key, {})
            cells = [f"{seconds[s]:.1f}" if s in seconds else "-" for s in ("v2mount", "mlserver")]
            lines.append(f"| {setup.title} | {' | '.join(cells)} |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    lines += [f"![v2mount vs MLServer]({chart})", ""]
    return "\n".join(lines)


def _chart(
    path: Path,
    setups: Sequence[Setup],
    agg: dict[tuple[str, str], Stats],
    memory: dict[str, dict[str, dict[str, float]]],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for s in setups for c in s.cases]
    labels = [f"{c.key}" for c in cases]
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(17, 0.45 * max(len(cases), 6) + 2.2),
        gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]},
    )
    colours = {"v2mount": "#1f77b4", "mlserver": "#ff7f0e"}
    y = list(range(len(cases)))
    for panel, metric, name in ((0, "rps", "requests/s (log)"), (1, "p99", "p99 latency ms (log)")):
        ax = axes[panel]
        for offset, server in ((-0.2, "v2mount"), (0.2, "mlserver")):
            values = []
            for case in cases:
                stats = agg.get((case.key, server)) if server == "v2mount" else _baseline(case, agg)
                values.append(stats[metric] if stats else 0)
            ax.barh(
                [v + offset for v in y],
                values,
                height=0.4,
                color=colours[server],
                label="v2mount" if server == "v2mount" else "MLServer 1.7.1",
            )
        if metric == "rps":
            for i, case in enumerate(cases):
                ours, theirs = agg.get((case.key, "v2mount")), _baseline(case, agg)
                ratio = _ratio(_get(ours, "rps"), _get(theirs, "rps"))
                if ratio is not None and ours is not None:
                    ax.text(
                        max(ours["rps"], theirs["rps"] if theirs else 0) * 1.08,
                        i,
                        f"{ratio:.2f}x",
                        va="center",
                        fontsize=8,
                    )
        ax.set_xscale("log")
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_yticklabels([])
    ax = axes[2]
    keys = [s.key for s in setups if s.key in memory]
    for offset, server in ((-0.2, "v2mount"), (0.2, "mlserver")):
        values = [memory[k].get(server, {}).get("pss_mb", 0) for k in keys]
        ax.bar([i + offset for i in range(len(keys))], values, width=0.4, color=colours[server])
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.legend(["v2mount", "MLServer 1.7.1"], fontsize=8)
    ax.set_ylabel("PSS MB at idle, 3 models")
    ax.set_title("memory", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    out: Path,
    name: str,
    *,
    setups: Sequence[Setup],
    runs: list[dict[str, Any]],
    memory: dict[str, dict[str, dict[str, float]]],
    startup: dict[str, dict[str, float]],
    machine: dict[str, Any],
    config: dict[str, Any],
    notes: Sequence[str],
) -> list[Path]:
    """Write ``name``.md/.json/.png into ``out``; return their paths."""
    agg = aggregate(runs)
    paths = [out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"]
    title = (
        f"v2mount vs MLServer 1.7.1 — {machine['cores']} shared cores, "
        f"Python {machine['python']}, {config['date']} ({config['mode']})"
    )
    paths[0].write_text(
        _markdown(setups, agg, memory, startup, machine, config, notes, paths[2].name)
    )
    document = {
        "config": config,
        "machine": machine,
        "runs": runs,
        "memory": memory,
        "startup_s": startup,
        "notes": list(notes),
    }
    paths[1].write_text(json.dumps(document, indent=1))
    _chart(paths[2], setups, agg, memory, title)
    return paths


def summarise_profile(raw: str, *, title: str, top: int = 30) -> str:
    """Top functions by self and by inclusive samples from py-spy's ``raw`` (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    per_process: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        processes = [f for f in frames if f.startswith("process ")]
        per_process[processes[-1][:100] if processes else "process ?"] += count
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not body:
            continue
        own[body[-1]] += count
        for frame in set(body):
            inclusive[frame] += count
        packages[_package(body[-1])] += count
    if total == 0:
        return f"# {title}\n\nno samples\n"
    lines = [f"# py-spy profile: {title}", f"{total} samples on CPU", "", "## samples per process"]
    lines += [f"{100 * n / total:6.1f} %  {p}" for p, n in per_process.most_common()]
    lines += ["", "## self time by package (leaf frame's file)"]
    lines += [f"{100 * n / total:6.1f} %  {p}" for p, n in packages.most_common(20)]
    lines += ["", f"## top {top} functions by self time"]
    lines += [f"{100 * n / total:6.1f} %  {f}" for f, n in own.most_common(top)]
    lines += ["", f"## top {top} functions by inclusive time"]
    lines += [f"{100 * n / total:6.1f} %  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def _package(frame: str) -> str:
    """'fn (path/to/pkg/mod.py:12)' -> 'pkg' (site-packages name, or the file's folder)."""
    if "(" not in frame:
        return frame
    location = frame.rsplit("(", 1)[1].rstrip(")").rsplit(":", 1)[0]
    parts = Path(location).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            index = parts.index(marker)
            return parts[index + 1] if index + 1 < len(parts) else location
    if "v2mount" in parts:
        return "v2mount/" + "/".join(parts[parts.index("v2mount") + 1 : -1])
    return parts[-2] if len(parts) > 1 else location
