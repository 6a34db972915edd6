"""Settings from the environment, settings.json and model-settings.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from v2mount.errors import SettingsError
from v2mount.settings import ModelSettings, load_model_settings, load_settings


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
