"""Showing a run: the table, the terminal chart, the PNG, the settings written out."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.bar import Bar
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from v2mount.tuning._inputs import TuneError
from v2mount.tuning._policy import Recommendation, peak
from v2mount.tuning._results import Sweep

__all__ = ["chart", "merge_settings", "result_document", "save_png", "table", "write_fragment"]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def table(sweeps: Sequence[Sweep], target_ms: float) -> Table:
    """Every step of every sweep; each sweep's peak in bold, p99 over target in red."""
    grid = Table(title="Measured (closed loop, one row per concurrency step)")
    grid.add_column("configuration")
    for name in ("concurrency", "req/s", "p50 ms", "p99 ms", "rows/batch", "errors"):
        grid.add_column(name, justify="right")
    for sweep in sweeps:
        if sweep.error is not None:
            grid.add_row(
                sweep.config.label, "", "", "", "", "", Text(sweep.error, "red"), end_section=True
            )
            continue
        best = peak(sweep, target_ms)
        for index, step in enumerate(sweep.steps):
            p99 = Text(_ms(step.p99_ms), "red" if step.p99_ms > target_ms else "")
            grid.add_row(
                sweep.config.label if index == 0 else "",
                str(step.concurrency),
                f"{step.throughput:,.0f}",
                _ms(step.p50_ms),
                p99,
                "" if step.mean_batch is None else f"{step.mean_batch:.1f}",
                str(step.errors),
                style="bold" if step is best else None,
                end_section=index == len(sweep.steps) - 1,
            )
    return grid


def chart(sweeps: Sequence[Sweep], target_ms: float, width: int = 40) -> RenderableType:
    """Peak throughput within the target per configuration, as horizontal bars."""
    peaks = [(s.config.label, peak(s, target_ms)) for s in sweeps if s.error is None]
    top = max((step.throughput for _, step in peaks if step is not None), default=0.0)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right")
    grid.add_column(width=width)
    grid.add_column(justify="right")
    for label, step in peaks:
        if step is None:
            grid.add_row(label, Text(f"misses the {target_ms:g} ms target", "red"), "")
            continue
        grid.add_row(
            label,
            Bar(top or 1.0, 0, step.throughput, width=width, color="green"),
            f"{step.throughput:,.0f} req/s  p99 {step.p99_ms:.1f} ms",
        )
    title = Text(f"Peak throughput with p99 ≤ {target_ms:g} ms", style="bold")
    return Group(title, grid)


def save_png(sweeps: Sequence[Sweep], target_ms: float, path: Path, title: str) -> bool:
    """Throughput and p99 against concurrency, one line per configuration.

    Returns ``False`` (writing nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or state
    except ImportError:
        return False
    figure = Figure(figsize=(11, 4.2))
    rate, latency = figure.subplots(1, 2)
    for sweep in sweeps:
        if not sweep.steps:
            continue
        x = [step.concurrency for step in sweep.steps]
        rate.plot(x, [s.throughput for s in sweep.steps], marker="o", label=sweep.config.label)
        latency.plot(x, [s.p99_ms for s in sweep.steps], marker="o", label=sweep.config.label)
    latency.axhline(target_ms, color="red", linestyle="--", label="p99 target")
    levels = sorted({step.concurrency for sweep in sweeps for step in sweep.steps})
    for axes, name in ((rate, "requests / s"), (latency, "p99 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel(name)
        axes.grid(True, alpha=0.3)
    latency.set_yscale("log")
    rate.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def result_document(sweeps: Sequence[Sweep], recommendation: Recommendation) -> dict[str, Any]:
    """Every measurement and the recommendation, as plain JSON data (``--json``)."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 3)

    return {
        "sweeps": [
            {
                "config": sweep.config.settings(),
                "error": sweep.error,
                "steps": [
                    {
                        "concurrency": step.concurrency,
                        "duration": step.duration,
                        "requests": step.requests,
                        "throughput": round(step.throughput, 1),
                        "p50_ms": number(step.p50_ms),
                        "p99_ms": number(step.p99_ms),
                        "mean_batch": step.mean_batch,
                        "errors": step.errors,
                        "error": step.error,
                    }
                    for step in sweep.steps
                ],
            }
            for sweep in sweeps
        ],
        "recommendation": {**recommendation.settings(), "reason": recommendation.reason},
    }


def write_fragment(recommendation: Recommendation, path: Path) -> None:
    """The recommended fields as a JSON object (a ``model-settings.json`` fragment).

    ``"batching": null`` in it means: no ``batching`` block.
    """
    path.write_text(json.dumps(recommendation.settings(), indent=2) + "\n", encoding="utf-8")


def merge_settings(recommendation: Recommendation, path: Path) -> None:
    """Set the recommended fields in an existing ``model-settings.json``, keeping the rest.

    A ``batching`` block is written when the predictive batcher is recommended, and
    removed otherwise (it would change how the fixed window is timed).
    """
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TuneError(f"cannot update {path}: {exc}") from None
    if not isinstance(document, dict):
        raise TuneError(f"cannot update {path}: it is not a JSON object")
    for key, value in recommendation.settings().items():
        if value is None:
            document.pop(key, None)  # no batching block: the fixed window, or none
        else:
            document[key] = value
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)
