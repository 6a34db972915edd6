"""``python -m v2mount tune``: flags, errors that exit 2, and one real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from v2mount.__main__ import main
from v2mount.repository import ModelRepository
from v2mount.tuning import TuneError
from v2mount.tuning.cli import build_parser, find_model, usable_cores

DEMO = Path(__file__).resolve().parents[2] / "v2mount" / "demo"


def test_tune_is_a_subcommand_with_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--latency-target-ms", "--duration", "--max-workers", "--slo-ms", "--write"):
        assert flag in help_text
    assert f"here {usable_cores()}" in help_text


def test_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["repo", "m", "--batch-sizes", "4,16", "--duration", "0.5"])
    assert (args.batch_sizes, args.duration, args.max_workers) == ([4, 16], 0.5, None)
    assert (args.no_predictive, args.slo_ms) == (False, None)
    args = build_parser().parse_args(["repo", "m", "--no-predictive", "--slo-ms", "40"])
    assert (args.no_predictive, args.slo_ms) == (True, 40.0)
    assert build_parser().parse_args(["r", "m", "--batch-sizes", "none"]).batch_sizes == []
    for bad in (["--batch-sizes", "1"], ["--duration", "0"], ["--slo-ms", "-5"]):
        with pytest.raises(SystemExit) as exit_:
            main(["tune", "repo", "m", *bad])
        assert exit_.value.code == 2
    assert "batch sizes must be at least 2" in capsys.readouterr().err


def test_the_default_version_or_the_one_asked_for() -> None:
    repository = ModelRepository(DEMO)
    assert find_model(repository, "linear", None).version == "2"
    assert find_model(repository, "linear", "1").version == "1"
    with pytest.raises(TuneError, match=r"has no version '3' \(versions: 1, 2\)"):
        find_model(repository, "linear", "3")


def test_an_unknown_model_or_folder_exits_2_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["tune", str(DEMO), "nope"]) == 2
    err = capsys.readouterr().err
    assert "model 'nope' is not in" in err and "(models there: identity, linear)" in err
    assert main(["tune", str(tmp_path / "missing"), "m"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_model_without_declared_inputs_asks_for_a_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tune", str(DEMO), "identity"]) == 2
    assert "declares no inputs in its model-settings.json" in capsys.readouterr().err


def test_without_rich_it_names_the_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "rich" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["tune", str(DEMO), "linear"]) == 2
    assert "pip install 'v2mount[tune]'" in capsys.readouterr().err


SLEEPY = '''
import time

from v2mount import Model


class Sleepy(Model):
    """20 ms per call, whatever the rows: batching should multiply its throughput."""

    def predict(self, payload):
        time.sleep(0.02)
        return {"y": payload["x"].sum(axis=1)}
'''


@pytest.mark.slow
def test_a_real_run_recommends_predictive_batching_for_a_fixed_cost_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in test_tune_real.py: 16 clients never fill the fixed window of 32 rows, which
    # waits its 200 ms every time (at most 73 req/s, under the +50 % over the 50 req/s
    # of one call at a time that --min-gain 0.5 asks); the predictive batcher does not.
    repository = tmp_path / "repo"
    (repository / "sleepy").mkdir(parents=True)
    (repository / "tune_sleepy_model.py").write_text(SLEEPY)
    settings = repository / "sleepy" / "model-settings.json"
    original = {
        "implementation": "tune_sleepy_model.Sleepy",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "parallel_workers": 3,
        "max_batch_time": 0.5,
    }
    settings.write_text(json.dumps(original))
    fragment, png, measured = (tmp_path / name for name in ("f.json", "c.png", "m.json"))
    argv = ["tune", str(repository), "sleepy", "--duration", "0.3", "--max-workers", "1"]
    argv += ["--max-concurrency", "16", "--batch-sizes", "32", "--batch-time-ms", "200"]
    argv += ["--latency-target-ms", "300", "--slo-ms", "250", "--min-gain", "0.5"]
    argv += ["--output", str(fragment), "--write", "--png", str(png), "--json", str(measured)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    text = " ".join(out.split())  # rich wraps the reason
    recommended = json.loads(fragment.read_text())
    assert recommended["parallel_workers"] in (0, 1)
    assert recommended == {
        "parallel_workers": recommended["parallel_workers"],
        "max_batch_size": 32,
        "max_batch_time": 0.0,
        "batching": {"slo_ms": 250},
    }
    assert json.loads(out.strip().splitlines()[-1]) == recommended
    written = json.loads(settings.read_text())
    assert written == {**original, **recommended}
    loaded = find_model(ModelRepository(repository), "sleepy", None)  # as the server would
    assert loaded.batching is not None and loaded.batching.slo_ms == 250
    assert 'so predictive batching on: "batching": {"slo_ms": 250}' in text
    for label in ("in-process", "1 worker", "batch 32/200 ms", "predictive 32/SLO 250 ms"):
        assert text.count(label) >= 2  # every kind was measured: in the table and the chart
    assert "answered 503" not in captured.err  # no log line per error answer
    assert png.read_bytes()[:4] == b"\x89PNG"
    document = json.loads(measured.read_text())
    assert document["recommendation"] == {
        **recommended,
        "reason": document["recommendation"]["reason"],
    }
    configs = [sweep["config"] for sweep in document["sweeps"]]
    assert [config["parallel_workers"] for config in configs[:2]] == [0, 1]
    assert [config["batching"] for config in configs[-2:]] == [None, {"slo_ms": 250}]
    assert all(sweep["steps"] for sweep in document["sweeps"])
