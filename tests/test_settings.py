"""Settings from the environment, settings.json and model-settings.json."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from v2mount.errors import SettingsError
from v2mount.repository import ModelRepository
from v2mount.settings import (
    ModelSettings,
    Settings,
    load_model_settings,
    load_settings,
    usable_cores,
)


def test_environment_and_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "settings.json").write_text(
        json.dumps({"server_name": "from-file", "model_parallel_workers": 3})
    )
    monkeypatch.setenv("V2MOUNT_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("V2MOUNT_MODEL_PARALLEL_WORKERS", "2")
    settings = load_settings()
    assert settings.server_name == "from-file"
    assert settings.model_parallel_workers == 2  # env wins over the file
    assert load_settings(model_parallel_workers=0).model_parallel_workers == 0


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V2MOUNT_MODEL_PARALLEL_WORKERS", "-1")
    with pytest.raises(SettingsError, match="model_parallel_workers"):
        load_settings()


def test_bad_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "settings.json").write_text("{not json")
    monkeypatch.setenv("V2MOUNT_MODEL_REPOSITORY", str(tmp_path))
    with pytest.raises(SettingsError, match=r"settings\.json"):
        load_settings()


def test_mlserver_model_settings_load_unchanged(tmp_path: Path) -> None:
    file = tmp_path / "model-settings.json"
    file.write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parallel_workers": 2,
                "max_batch_size": 8,
                "max_batch_time": 0.01,
                "warm_workers": False,
                "parameters": {"uri": "./model.joblib", "version": "v1", "extra": {"x": 1}},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            }
        )
    )
    settings = load_model_settings(file)
    assert (settings.name, settings.version, settings.parallel_workers) == ("iris", "v1", 2)
    assert (settings.max_batch_size, settings.max_batch_time) == (8, 0.01)
    assert settings.resolve_uri() == tmp_path / "model.joblib"
    assert settings.inputs[0].shape == [-1, 4]


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"name": "m", "parallel_workers": -2}, "parallel_workers"),
        (
            {"name": "m", "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]},
            "inputs.0.datatype",
        ),
        (
            {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-3]}]},
            "inputs.0.shape",
        ),
        ({"name": "a/b"}, "name"),
        ({"name": "m", "max_batch_time": "soon"}, "max_batch_time"),
    ],
)
def test_bad_model_settings_name_file_and_field(
    tmp_path: Path, document: dict[str, object], field: str
) -> None:
    file = tmp_path / "model-settings.json"
    file.write_text(json.dumps(document))
    with pytest.raises(SettingsError) as info:
        load_model_settings(file)
    assert str(file) in info.value.message and field in info.value.message


def test_model_settings_defaults_are_unset() -> None:
    settings = ModelSettings(name="m")
    assert settings.parallel_workers is None and settings.version is None


def test_a_typo_in_model_settings_warns_with_the_file_and_a_suggestion(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "iris"
    folder.mkdir()
    document = {
        "implementation": "v2mount.demo.models.Identity",
        "paralel_workers": 1,
        "max_batch_sise": 8,
        "warm_workers": True,
        "versions": ["1"],
        "zzz": 0,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "optinal": True}],
    }
    (folder / "model-settings.json").write_text(json.dumps(document))
    caplog.set_level(logging.INFO, logger="v2mount")
    repository = ModelRepository(tmp_path)
    (settings,) = repository.scan()
    repository.scan()  # a second scan (the index does one per call) repeats nothing
    assert settings.parallel_workers is None
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "iris/model-settings.json: unknown field 'paralel_workers' "
            "(did you mean 'parallel_workers'?)",
        ),
        (
            "WARNING",
            "iris/model-settings.json: unknown field 'max_batch_sise' "
            "(did you mean 'max_batch_size'?)",
        ),
        ("WARNING", "iris/model-settings.json: unknown field 'zzz'"),
        (
            "INFO",
            "iris/model-settings.json: MLServer fields v2mount does not use, ignored: "
            "versions, warm_workers",
        ),
        (
            "WARNING",
            "iris/model-settings.json: inputs[0]: unknown field 'optinal' "
            "(did you mean 'optional'?)",
        ),
    ]


def test_mlserver_server_settings_mean_what_they_mean_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    document = {
        "parallel_workers": 2,
        "http_port": 8080,
        "host": "0.0.0.0",
        "debug": True,
        "metrics_endpoint": "/prometheus",
        "server_name": "mlserver",
        "load_models_at_startup": True,
        "gzip_enabled": False,
        "model_paralel_workers": 3,
    }
    (tmp_path / "settings.json").write_text(json.dumps(document))
    monkeypatch.setenv("V2MOUNT_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("V2MOUNT_MODEL_MAX_BATCH_SISE", "4")
    caplog.set_level(logging.INFO, logger="v2mount")
    settings = load_settings()
    assert settings.model_parallel_workers == 2
    assert (settings.http_port, settings.host, settings.log_level) == (8080, "0.0.0.0", "debug")
    assert (settings.metrics_path, settings.server_name) == ("/prometheus", "mlserver")
    assert settings.compress_responses is False  # MLServer's gzip_enabled
    messages = [r.getMessage() for r in caplog.records]
    file = tmp_path / "settings.json"
    assert messages == [
        "environment: unknown variable 'V2MOUNT_MODEL_MAX_BATCH_SISE' "
        "(did you mean 'V2MOUNT_MODEL_MAX_BATCH_SIZE'?)",
        f"{file}: unknown field 'model_paralel_workers' (did you mean 'model_parallel_workers'?)",
        f"{file}: MLServer fields v2mount does not use, ignored: load_models_at_startup",
    ]
    # v2mount's own name wins over MLServer's when a file has both.
    (tmp_path / "settings.json").write_text(
        json.dumps({"parallel_workers": 2, "model_parallel_workers": 0, "debug": False})
    )
    settings = load_settings()
    assert (settings.model_parallel_workers, settings.log_level) == (0, "info")


def test_an_unknown_keyword_setting_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(SettingsError, match=r"'model_paralel_workers' \(did you mean"):
        load_settings(model_paralel_workers=0)
    with pytest.raises(SettingsError, match="log_level: Value error, must be one of"):
        load_settings(log_level="loud")


def test_the_default_worker_count_fits_the_machine() -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    assert Settings().model_parallel_workers == 1  # MLServer's default
    assert Settings().default_workers() == 1
    assert Settings(model_parallel_workers=cores + 3).default_workers() == cores
    assert Settings(model_parallel_workers=0).default_workers() == 0
