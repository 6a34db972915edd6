"""Finding models on disk and turning settings into ``Model`` instances.

A repository is a folder scanned recursively for ``model-settings.json`` files. A model's
name defaults to its folder's name; a folder whose name is all digits is a *version*
folder: the name then defaults to the parent folder's name and ``parameters.version`` to
the folder's name (``iris/1/model-settings.json``, ``iris/2/model-settings.json``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from v2mount.errors import SettingsError
from v2mount.model import Model
from v2mount.settings import MODEL_SETTINGS_FILE, ModelSettings, load_model_settings

__all__ = ["ModelRepository", "import_implementation", "instantiate"]


def import_implementation(path: str) -> type[Model]:
    """Import ``"package.module.Class"`` (MLServer runtime names map to ours)."""
    from v2mount.runtimes import ALIASES

    target = ALIASES.get(path, path)
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise SettingsError(f"implementation {path!r} must be a dotted path 'module.Class'")
    try:
        module = importlib.import_module(module_name)
        implementation = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"cannot import implementation {path!r}: {exc}") from None
    return implementation  # type: ignore[no-any-return]


def instantiate(settings: ModelSettings) -> Model:
    """A fresh, unloaded model for ``settings``."""
    implementation: Any = settings.implementation
    if implementation is None:
        raise SettingsError(f"model {settings.name!r}: 'implementation' is required")
    if isinstance(implementation, str):
        implementation = import_implementation(implementation)
    if isinstance(implementation, type) and issubclass(implementation, Model):
        return implementation(settings)
    if callable(implementation):
        from v2mount.runtimes.callable import CallableModel

        return CallableModel(settings, function=implementation)
    raise SettingsError(
        f"model {settings.name!r}: implementation {implementation!r} is not a Model subclass"
    )


class ModelRepository:
    """A folder of models; ``scan`` re-reads every settings file (picks up edits)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SettingsError(f"model repository {root} is not a folder")
        if str(self.root) not in sys.path:
            # Implementations next to their settings (MLServer does the same).
            sys.path.append(str(self.root))

    def scan(self) -> list[ModelSettings]:
        found: list[ModelSettings] = []
        for file in sorted(self.root.rglob(MODEL_SETTINGS_FILE)):
            folder = file.parent
            defaults: dict[str, Any] = {"name": folder.name}
            if folder.name.isdigit() and folder.parent != self.root:
                defaults = {"name": folder.parent.name, "parameters": {"version": folder.name}}
            found.append(load_model_settings(file, **defaults))
        names: dict[tuple[str, str | None], Path] = {}
        for settings in found:
            key = (settings.name, settings.version)
            if key in names:
                raise SettingsError(
                    f"model {settings.name!r} version {settings.version!r} is defined twice: "
                    f"{names[key]} and {settings.source_dir}"
                )
            names[key] = settings.source_dir or self.root
        return found

    def find(self, name: str) -> list[ModelSettings]:
        """Every version of ``name`` in the repository (empty if none)."""
        return [settings for settings in self.scan() if settings.name == name]
