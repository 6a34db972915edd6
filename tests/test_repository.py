"""Scanning a model repository folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from v2mount.errors import SettingsError
from v2mount.repository import BrokenModel, ModelRepository, instantiate
from v2mount.settings import ModelSettings


def write(folder: Path, document: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-settings.json").write_text(json.dumps(document))


IMPL = "v2mount.demo.models.Identity"


def test_names_and_versions_from_folders(tmp_path: Path) -> None:
    write(tmp_path / "plain", {"implementation": IMPL})
    write(tmp_path / "named", {"name": "other", "implementation": IMPL})
    write(tmp_path / "multi" / "1", {"implementation": IMPL})
    write(tmp_path / "multi" / "2", {"implementation": IMPL})
    write(tmp_path / "12", {"implementation": IMPL})  # top-level digits: a name
    found = {(s.name, s.version) for s in ModelRepository(tmp_path).scan()}
    assert found == {("plain", None), ("other", None), ("multi", "1"), ("multi", "2"), ("12", None)}
    assert [s.version for s in ModelRepository(tmp_path).find("multi")] == ["1", "2"]


def test_a_duplicate_model_is_broken_and_the_first_serves(tmp_path: Path) -> None:
    write(tmp_path / "a", {"name": "same", "implementation": IMPL})
    write(tmp_path / "b", {"name": "same", "implementation": IMPL})
    first, second = ModelRepository(tmp_path).scan_all()
    assert isinstance(first, ModelSettings) and first.source_dir == tmp_path / "a"
    assert isinstance(second, BrokenModel)
    assert second.reason == (
        "model same is defined twice: a/model-settings.json and b/model-settings.json"
    )


def test_missing_folder_and_bad_implementation(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not a folder"):
        ModelRepository(tmp_path / "nope")
    write(tmp_path / "m", {"implementation": "no_such_module.Model"})
    (settings,) = ModelRepository(tmp_path).scan()
    with pytest.raises(SettingsError, match="cannot import implementation"):
        instantiate(settings)
    write(tmp_path / "m", {"implementation": "json.dumps.__name__"})
    (settings,) = ModelRepository(tmp_path).scan()
    with pytest.raises(SettingsError):
        instantiate(settings)


def test_mlserver_fields_ignored_in_many_files_make_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a", "b", "c"):
        write(tmp_path / name, {"implementation": IMPL, "warm_workers": True})
    write(tmp_path / "d", {"implementation": IMPL, "versions": ["1"], "warm_workers": False})
    caplog.set_level(logging.INFO, logger="v2mount")
    repository = ModelRepository(tmp_path)
    repository.scan()
    repository.scan()
    assert [r.getMessage() for r in caplog.records] == [
        "4 model-settings.json files have MLServer fields v2mount does not use, ignored: "
        "versions (1 of them), warm_workers (4 of them)"
    ]
