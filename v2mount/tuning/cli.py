"""``python -m v2mount tune REPOSITORY MODEL``: measure a model, recommend its settings.

Serves the model in this process with a real ``V2App`` at rising concurrency, first in
process and with pools of 1, 2, … workers, then with fixed-window and with predictive
batching, and prints the table, a chart and the recommended ``parallel_workers``,
``max_batch_size``, ``max_batch_time`` and ``batching`` block with the reason. Needs the
extra ``v2mount[tune]`` (rich).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio

from v2mount.errors import SettingsError
from v2mount.registry import version_key
from v2mount.repository import ModelRepository
from v2mount.settings import MODEL_SETTINGS_FILE, ModelSettings, load_settings, usable_cores
from v2mount.tuning._inputs import TuneError, load_request, request_body, synthetic_request
from v2mount.tuning._results import Config, Step
from v2mount.tuning._tuner import TuneOptions, TuneResult, concurrency_levels, tune

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["build_parser", "main", "usable_cores"]

PROG = "python -m v2mount tune"

Number = TypeVar("Number", int, float)


def _positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind(text)``, which must be greater than 0."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def _sizes(text: str) -> list[int]:
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if any(size < 2 for size in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be at least 2")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Measure one model at rising concurrency (in process, with 1…N workers, without "
            "batching, with fixed-window and with predictive batching) and recommend "
            "parallel_workers, max_batch_size, max_batch_time and batching. See "
            "docs/tuning.md."
        ),
    )
    parser.add_argument("repository", type=Path, help="model repository folder")
    parser.add_argument("model", help="model name in the repository")
    parser.add_argument("--version", help="model version (default: the default version)")
    measure = parser.add_argument_group("measuring")
    measure.add_argument(
        "--latency-target-ms",
        type=_positive(float),
        default=100.0,
        help="p99 latency a configuration must stay under (default: %(default)s)",
    )
    measure.add_argument(
        "--duration",
        type=_positive(float),
        default=2.0,
        help="seconds per load step (default: %(default)s)",
    )
    measure.add_argument(
        "--max-workers",
        type=_positive(int),
        default=None,
        help=f"largest pool to try (default: the usable cores, here {usable_cores()})",
    )
    measure.add_argument(
        "--max-concurrency",
        type=_positive(int),
        default=64,
        help="highest concurrency; steps go 1, 2, 4, … up to it (default: %(default)s)",
    )
    measure.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=[8, 32],
        help="max_batch_size values to try, comma-separated, or 'none' (default: 8,32)",
    )
    measure.add_argument(
        "--batch-time-ms",
        type=_positive(float),
        default=None,
        help="max_batch_time to try (default: one request's p50 latency, 1 to 50 ms)",
    )
    measure.add_argument(
        "--no-predictive",
        action="store_true",
        help="do not try the predictive batcher (a batching block with slo_ms)",
    )
    measure.add_argument(
        "--slo-ms",
        type=_positive(float),
        default=None,
        help="the predictive batcher's slo_ms to try (default: 80%% of --latency-target-ms)",
    )
    measure.add_argument(
        "--min-gain",
        type=_positive(float),
        default=0.10,
        help="fraction of throughput a worker or batching must add to count (default: 0.10)",
    )
    measure.add_argument(
        "--repeat",
        type=_positive(int),
        default=1,
        help="measure each step this many times and keep the median (default: %(default)s)",
    )
    measure.add_argument(
        "--no-in-process", action="store_true", help="do not try parallel_workers 0"
    )
    measure.add_argument(
        "--through",
        choices=["asgi", "registry"],
        default="asgi",
        help="asgi: the whole app minus sockets (default); registry: ModelHandle.infer only",
    )
    data = parser.add_argument_group("request")
    data.add_argument(
        "--request", type=Path, help="JSON V2 request to send (default: random declared inputs)"
    )
    data.add_argument(
        "--rows",
        type=_positive(int),
        default=1,
        help="rows per generated request, for the first -1 dimension (default: %(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output", type=Path, help="write the recommended settings as a JSON fragment here"
    )
    out.add_argument(
        "--write",
        action="store_true",
        help=f"set the recommended fields in the model's own {MODEL_SETTINGS_FILE}",
    )
    out.add_argument("--json", type=Path, help="write every measurement as JSON here")
    out.add_argument(
        "--png",
        default=None,
        help="chart file (default: tune-MODEL.png when matplotlib is installed; 'none': off)",
    )
    return parser


def find_model(repository: ModelRepository, name: str, version: str | None) -> ModelSettings:
    """The settings of ``name`` (and ``version``) in the repository."""
    found = repository.find(name)
    if not found:
        names = sorted({s.name for s in repository.scan()})
        raise TuneError(
            f"model {name!r} is not in {repository.root} (models there: "
            f"{', '.join(names) or 'none'})"
        )
    if version is not None:
        for settings in found:
            if settings.version == version:
                return settings
        versions = ", ".join(str(s.version) for s in found)
        raise TuneError(f"model {name!r} has no version {version!r} (versions: {versions})")
    marked = [s for s in found if s.default_version]
    return marked[0] if marked else max(found, key=lambda s: version_key(s.version))


class _ProgressListener:
    """Drives a rich progress bar: one unit per load step."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID = progress.add_task("starting", total=None)
        self.done = 0

    def started(self, config: Config) -> None:
        self.progress.update(self.task, description=f"{config.label}: starting")

    def measured(self, config: Config, step: Step) -> None:
        self.done += 1
        self.progress.update(
            self.task,
            completed=self.done,
            description=(
                f"{config.label}: {step.concurrency} concurrent, "
                f"{step.throughput:,.0f} req/s, p99 {step.p99_ms:.1f} ms"
            ),
        )

    def remaining(self, steps: int) -> None:
        self.progress.update(self.task, total=self.done + steps)


@contextmanager
def _quiet_answers() -> Iterator[None]:
    """Hide the server's log line per error answer while measuring, then restore it.

    The table counts the errors and the reason quotes the first; a line per 503 (a
    batcher refusing requests at the end of a ramp) would bury the progress bar.
    """
    answers = logging.getLogger("v2mount.rest")
    level = answers.level
    answers.setLevel(logging.ERROR)
    try:
        yield
    finally:
        answers.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from v2mount.tuning._bench import AppBench
    from v2mount.tuning._report import (
        chart,
        merge_settings,
        result_document,
        save_png,
        table,
        write_fragment,
    )

    repository = ModelRepository(args.repository)
    model = find_model(repository, args.model, args.version)
    server = load_settings(model_repository=repository.root)
    if args.request is not None:
        document = load_request(args.request)
    else:
        document = synthetic_request(model, args.rows)
    body, request = request_body(document)
    options = TuneOptions(
        latency_target_ms=args.latency_target_ms,
        duration=args.duration,
        max_workers=args.max_workers or usable_cores(),
        max_concurrency=args.max_concurrency,
        batch_sizes=tuple(args.batch_sizes),
        batch_time=None if args.batch_time_ms is None else args.batch_time_ms / 1000,
        in_process=not args.no_in_process,
        min_gain=args.min_gain,
        repeat=args.repeat,
        predictive=not args.no_predictive,
        slo_ms=args.slo_ms,
    )
    bench = AppBench(model, server, body, request, through=args.through)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
    err = Console(stderr=True, highlight=False)
    steps = len(concurrency_levels(options.max_concurrency))
    batch_configs = len(options.batch_configs(0, 0.0))
    configs = options.max_workers + int(options.in_process) + batch_configs
    label = model.name if model.version is None else f"{model.name}:{model.version}"
    err.print(
        f"Tuning {label} from {repository.root}: up to {configs} configurations x {steps} "
        f"steps x {options.repeat} of {options.duration:g} s, p99 target "
        f"{options.latency_target_ms:g} ms, {usable_cores()} usable cores, "
        f"load through {args.through}."
    )
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress, _quiet_answers():
        listener = _ProgressListener(progress)
        uvloop = importlib.util.find_spec("uvloop") is not None
        result: TuneResult = anyio.run(
            tune,
            bench,
            options,
            listener,
            backend="asyncio",
            backend_options={"use_uvloop": uvloop},
        )
    recommendation = result.recommendation
    out.print(table(result.sweeps, options.latency_target_ms))
    out.print()
    out.print(chart(result.sweeps, options.latency_target_ms))
    out.print()
    png = args.png if args.png is not None else f"tune-{model.name}.png"
    if png.lower() != "none":
        if save_png(result.sweeps, options.latency_target_ms, Path(png), f"v2mount tune {label}"):
            out.print(f"Chart: {png}")
        elif args.png is not None:
            err.print("No PNG: matplotlib is not installed (pip install matplotlib).")
    out.print("[bold]Recommendation[/bold]: " + recommendation.reason)
    if args.json is not None:
        document = result_document(result.sweeps, recommendation)
        args.json.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        out.print(f"Measurements: {args.json}")
    if args.output is not None:
        write_fragment(recommendation, args.output)
        out.print(f"Wrote {args.output}")
    if args.write:
        target = (model.source_dir or repository.root) / MODEL_SETTINGS_FILE
        merge_settings(recommendation, target)
        out.print(f"Updated {target}")
    print(json.dumps(recommendation.settings()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 (with the reason on stderr) when it cannot."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("rich") is None:
        print(f"{PROG} needs rich: pip install 'v2mount[tune]'", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (TuneError, SettingsError) as exc:
        message = exc.message if isinstance(exc, SettingsError) else str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the pools were stopped on the way out
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
