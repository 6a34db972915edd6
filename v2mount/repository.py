"""Finding models on disk and turning settings into ``Model`` instances.

A repository is a folder scanned recursively for ``model-settings.json`` files. A model's
name defaults to its folder's name; a folder whose name is all digits is a *version*
folder: the name then defaults to the parent folder's name and ``parameters.version`` to
the folder's name (``iris/1/model-settings.json``, ``iris/2/model-settings.json``).

A file that cannot be used (bad JSON, a bad value, an implementation that does not
import, a second definition of the same version) does not stop the others: it becomes a
``BrokenModel``, served as UNAVAILABLE with a reason that names the model and the file
(relative to the repository, so no absolute path reaches a client).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v2mount.errors import SettingsError, describe_exception
from v2mount.model import Model
from v2mount.settings import MODEL_SETTINGS_FILE, ModelSettings, Notice, load_model_settings

__all__ = ["BrokenModel", "ModelRepository", "import_implementation", "instantiate"]

logger = logging.getLogger("v2mount.repository")


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
    except Exception as exc:  # the module itself raised while being imported
        raise SettingsError(
            f"cannot import implementation {path!r}: {describe_exception(exc)}"
        ) from exc
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


@dataclass(frozen=True, slots=True)
class BrokenModel:
    """A model whose settings file cannot be used, and why (names model and file)."""

    name: str
    version: str | None
    reason: str

    def placeholder(self) -> Model:
        """An unloaded stand-in carrying the name and version, for the registry."""
        parameters = {"version": self.version} if self.version is not None else {}
        return Model({"name": self.name, "parameters": parameters})


class ModelRepository:
    """A folder of models; ``scan`` re-reads every settings file (picks up edits).

    Warnings about a file (unknown fields, MLServer fields ignored) are logged once per
    repository, however often it is scanned.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SettingsError(f"model repository {root} is not a folder")
        if str(self.root) not in sys.path:
            # Implementations next to their settings (MLServer does the same).
            sys.path.append(str(self.root))
        self._reported: set[str] = set()

    def _report(self, notices: list[Notice]) -> None:
        """Log each notice once; the ignored MLServer fields of all files in one line."""
        ignoring = [notice for notice in notices if notice.ignored]
        if len(ignoring) > 1:
            files = Counter(field for notice in ignoring for field in notice.ignored)
            counts = ", ".join(f"{field} ({n} of them)" for field, n in sorted(files.items()))
            summary = (
                f"{len(ignoring)} model-settings.json files have MLServer fields v2mount "
                f"does not use, ignored: {counts}"
            )
            notices = [n for n in notices if not n.ignored] + [Notice(logging.INFO, summary)]
        for notice in notices:
            if notice.message not in self._reported:
                self._reported.add(notice.message)
                notice.log()

    def scan_all(self) -> list[ModelSettings | BrokenModel]:
        """Every model version in the folder: its settings, or why they are broken."""
        found: list[ModelSettings | BrokenModel] = []
        sources: dict[tuple[str, str | None], str] = {}
        notices: list[Notice] = []
        for file in sorted(self.root.rglob(MODEL_SETTINGS_FILE)):
            folder = file.parent
            source = file.relative_to(self.root).as_posix()
            name, version = folder.name, None
            if folder.name.isdigit() and folder.parent != self.root:
                name, version = folder.parent.name, folder.name
            defaults: dict[str, Any] = {"name": name}
            if version is not None:
                defaults["parameters"] = {"version": version}
            try:
                entry: ModelSettings | BrokenModel = load_model_settings(
                    file, notices=notices, source=source, **defaults
                )
            except SettingsError as exc:
                entry = BrokenModel(name, version, f"model {name!r}: {exc.message}")
            key = (entry.name, entry.version)
            if key in sources:
                label = entry.name if entry.version is None else f"{entry.name}:{entry.version}"
                entry = BrokenModel(
                    entry.name,
                    entry.version,
                    f"model {label} is defined twice: {sources[key]} and {source}",
                )
            else:
                sources[key] = source
            found.append(entry)
        self._report(notices)
        return found

    def scan(self) -> list[ModelSettings]:
        """The model versions whose settings are usable."""
        return [entry for entry in self.scan_all() if isinstance(entry, ModelSettings)]

    def find(self, name: str) -> list[ModelSettings]:
        """Every version of ``name`` whose settings are usable (empty if none)."""
        return [entry for entry in self.scan() if entry.name == name]

    def find_all(self, name: str) -> list[ModelSettings | BrokenModel]:
        """Every version of ``name`` in the repository, broken ones included."""
        return [entry for entry in self.scan_all() if entry.name == name]

    def load(self, entries: list[ModelSettings | BrokenModel]) -> list[Model | BrokenModel]:
        """Instantiate each model; one whose implementation fails becomes a ``BrokenModel``.

        Logs one error per broken model, so one start reports every problem.
        """
        from v2mount.codecs.content import check_declared_content_types

        loaded: list[Model | BrokenModel] = []
        for entry in entries:
            result: Model | BrokenModel
            if isinstance(entry, BrokenModel):
                result = entry
            else:
                try:
                    check_declared_content_types(entry)
                    result = instantiate(entry)
                except SettingsError as exc:
                    source = self._source(entry)
                    reason = f"model {entry.name!r}: {source}{exc.message}"
                    result = BrokenModel(entry.name, entry.version, reason)
            if isinstance(result, BrokenModel):
                logger.error("%s", result.reason)
            loaded.append(result)
        return loaded

    def _source(self, settings: ModelSettings) -> str:
        if settings.source_dir is None:
            return ""
        try:
            folder = settings.source_dir.resolve().relative_to(self.root)
        except ValueError:
            return ""
        return f"{(folder / MODEL_SETTINGS_FILE).as_posix()}: "
