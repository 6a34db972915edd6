"""The table, the terminal chart, the PNG and the settings files of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from v2mount.settings import ModelSettings
from v2mount.tuning import Config, Step, Sweep, TuneError, recommend
from v2mount.tuning._report import (
    chart,
    merge_settings,
    result_document,
    save_png,
    table,
    write_fragment,
)


def sweeps() -> list[Sweep]:
    return [
        Sweep(Config(1), [Step(1, 1.0, 900, 0, 1.0, 1.5), Step(2, 1.0, 1500, 0, 1.2, 2.5)]),
        Sweep(Config(2), error="model did not start with 2 workers: out of memory"),
        Sweep(Config(1, 8, 0.001), [Step(1, 1.0, 400, 0, 2.0, 180.0, 1.0)]),
    ]


def with_predictive() -> list[Sweep]:
    refused = Step(2, 1.0, 700, 12, 1.5, 3.0, 2.0, "HTTP 503: predicted late")
    return [
        *sweeps(),
        Sweep(Config(1, 8, slo_ms=50), [Step(1, 1.0, 950, 0, 0.9, 1.4, 1.0), refused]),
    ]


def render(renderable: object) -> str:
    console = Console(record=True, width=180)
    console.print(renderable)
    return console.export_text()


def test_the_table_has_a_row_per_step_and_the_errors() -> None:
    text = render(table(with_predictive(), target_ms=100))
    assert "1 worker" in text and "1,500" in text and "2.5" in text
    assert "out of memory" in text
    assert "1 worker, batch 8/1 ms" in text and "180.0" in text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if "predictive 8/SLO 50 ms" in line)
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines[row : row + 2]]
    assert cells == [
        ["1 worker, predictive 8/SLO 50 ms", "1", "950", "0.9", "1.4", "1.0", "0"],
        ["", "2", "700", "1.5", "3.0", "2.0", "12"],
    ]


def test_the_chart_shows_each_peak_or_that_it_missed_the_target() -> None:
    text = render(chart(with_predictive(), target_ms=100))
    assert "Peak throughput with p99 ≤ 100 ms" in text
    assert "1,500 req/s  p99 2.5 ms" in text
    bar = next(line for line in text.splitlines() if "predictive 8/SLO 50 ms" in line)
    assert bar.endswith("950 req/s  p99 1.4 ms")  # its peak: the step that refused none
    assert "misses the 100 ms target" in text
    assert "out of memory" not in text  # a configuration that never ran has no bar


def test_the_png_is_drawn_when_matplotlib_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chart.png"
    assert save_png(with_predictive(), 100, path, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    other = tmp_path / "none.png"
    assert not save_png(sweeps(), 100, other, "title")
    assert not other.exists()


def test_the_fragment_and_the_settings_file(tmp_path: Path) -> None:
    recommendation = recommend(sweeps(), 100)
    fragment = tmp_path / "fragment.json"
    write_fragment(recommendation, fragment)
    expected = {"parallel_workers": 1, "max_batch_size": 0, "max_batch_time": 0.0}
    assert json.loads(fragment.read_text()) == {**expected, "batching": None}
    settings = tmp_path / "model-settings.json"
    settings.write_text(
        '{"name": "m", "implementation": "a.B", "parallel_workers": 4, '
        '"max_batch_size": 8, "batching": {"slo_ms": 20}}'
    )
    merge_settings(recommendation, settings)  # a batching block would time the batches
    assert json.loads(settings.read_text()) == {"name": "m", "implementation": "a.B", **expected}
    with_predictive = [
        *sweeps(),
        Sweep(Config(1, 32, slo_ms=100), [Step(8, 1.0, 3000, 0, 2.0, 9.0, 7.5)]),
    ]
    merge_settings(recommend(with_predictive, 100), settings)
    assert json.loads(settings.read_text()) == {
        "name": "m",
        "implementation": "a.B",
        "parallel_workers": 1,
        "max_batch_size": 32,
        "max_batch_time": 0.0,
        "batching": {"slo_ms": 100},
    }
    ModelSettings.model_validate(json.loads(settings.read_text()))  # loads as written
    settings.write_text("[1, 2]")
    with pytest.raises(TuneError, match="it is not a JSON object"):
        merge_settings(recommendation, settings)
    with pytest.raises(TuneError, match="cannot update"):
        merge_settings(recommendation, tmp_path / "missing.json")


def test_the_json_document_holds_every_step_and_the_reason() -> None:
    measured = sweeps()
    document = result_document(measured, recommend(measured, 100))
    assert [len(s["steps"]) for s in document["sweeps"]] == [2, 0, 1]
    assert document["sweeps"][1]["error"].endswith("out of memory")
    assert document["sweeps"][0]["steps"][1] == {
        "concurrency": 2,
        "duration": 1.0,
        "requests": 1500,
        "throughput": 1500.0,
        "p50_ms": 1.2,
        "p99_ms": 2.5,
        "mean_batch": None,
        "errors": 0,
        "error": None,
    }
    assert document["recommendation"]["parallel_workers"] == 1
    measured = with_predictive()
    document = result_document(measured, recommend(measured, 100))
    assert document["sweeps"][-1]["config"]["batching"] == {"slo_ms": 50}
    assert document["sweeps"][-1]["steps"][1]["error"] == "HTTP 503: predicted late"
    assert document["recommendation"]["batching"] is None
    assert "Predictive batching at best" in document["recommendation"]["reason"]
    assert document["recommendation"]["reason"].startswith("One worker peaks at 1,500 req/s")
