"""The public surface is small, declared, and importable."""

from __future__ import annotations

import importlib

import pytest

import v2mount

PUBLIC_MODULES = [
    "v2mount",
    "v2mount.errors",
    "v2mount.types",
    "v2mount.settings",
    "v2mount.model",
    "v2mount.runner",
    "v2mount.registry",
    "v2mount.repository",
    "v2mount.metadata",
    "v2mount.codecs",
    "v2mount.rest",
    "v2mount.metrics",
    "v2mount.testing",
    "v2mount.runtimes",
    "v2mount.codecs.content",
    "v2mount.grpc",
    "v2mount.tuning",
    "v2mount.tuning.cli",
]


def test_top_level_surface() -> None:
    assert sorted(v2mount.__all__) == [
        "InferenceRequest",
        "InferenceResponse",
        "Model",
        "ModelSettings",
        "RequestedOutput",
        "Settings",
        "Tensor",
        "TensorSpec",
        "V2App",
        "V2Middleware",
    ]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_export_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported)
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.{attribute}"


def test_app_is_built_on_access_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("V2MOUNT_MODEL_REPOSITORY", raising=False)
    first, second = v2mount.app, v2mount.app
    assert isinstance(first, v2mount.V2App) and first is not second
    assert {h.name for h in first.registry.handles()} == {"identity", "linear"}
    with pytest.raises(AttributeError):
        v2mount.nothing  # noqa: B018
