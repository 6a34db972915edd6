"""``python -m v2mount``: flags become settings, uvicorn gets the app; errors exit 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from v2mount import V2App
from v2mount.__main__ import build_parser, main, settings_overrides
from v2mount.settings import Settings


def test_every_setting_has_a_flag() -> None:
    parser = build_parser()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in parser.format_help(), flag
    args = parser.parse_args(["--repository", "models", "--metrics-path", "none"])
    assert settings_overrides(args) == {"model_repository": "models", "metrics_path": None}
    assert settings_overrides(parser.parse_args([])) == {}
    # Each flag's metavar says the unit.
    text = " ".join(parser.format_help().split())
    assert "--model-max-worker-memory-mb MB" in text
    assert "--model-max-batch-time SECONDS" in text and "--port N, --http-port N" in text


def test_main_runs_uvicorn_with_the_app_and_the_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    argv = ["--repository", str(tmp_path), "--port", "9001", "--model-parallel-workers", "0"]
    argv += ["--docs-enabled", "false", "--root-path", "/proxy", "--log-level", "warning"]
    assert main(argv) == 0
    ((app, options),) = calls
    assert isinstance(app, V2App) and app.repository is not None
    assert app.repository.root == tmp_path.resolve()
    assert app.settings.model_parallel_workers == 0 and app.settings.docs_enabled is False
    log_config = options.pop("log_config")
    assert options == {
        "host": "127.0.0.1",
        "port": 9001,
        "root_path": "/proxy",
        "log_level": "warning",
        "lifespan": "on",
    }
    # uvicorn's loggers and v2mount's share one format carrying time, level and name.
    formats = {f["fmt"] for f in log_config["formatters"].values()}
    assert all(fmt.startswith("%(asctime)s %(levelprefix)s %(name)s: ") for fmt in formats)
    assert log_config["loggers"]["v2mount"]["level"] == logging.WARNING
    assert log_config["loggers"]["uvicorn.access"]["level"] == logging.WARNING


def test_bad_settings_exit_2_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--model-max-batch-size", "-1"]) == 2
    assert "model_max_batch_size: Input should be greater than or equal to 0" in (
        capsys.readouterr().err
    )
    assert main(["--repository", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_without_uvicorn_it_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main([]) == 2
    assert "pip install 'v2mount[server]'" in capsys.readouterr().err


def test_grpc_listens_on_the_host_unless_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    common = ["--repository", str(tmp_path), "--host", "0.0.0.0"]
    assert main(common) == 0
    assert main([*common, "--grpc-host", "127.0.0.2"]) == 0
    assert [app.settings.grpc_host for app in apps] == ["0.0.0.0", "127.0.0.2"]
