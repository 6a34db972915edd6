"""What the framework runtimes share: finding the model file, the optional import, the
thread count, the outputs a request wants, and encoding the answer."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from v2mount.codecs.content import encode_outputs
from v2mount.errors import BadRequest
from v2mount.model import Model
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["FrameworkModel", "import_extra"]


def import_extra(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, naming the extra that installs it when missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed ({exc}); install it with: pip install 'v2mount[{extra}]'"
        ) from exc


class FrameworkModel(Model):
    """A ``Model`` that serves a file saved by a framework (``parameters.uri``).

    ``parameters.uri`` is a file, or a folder holding one of ``well_known_files``; left
    out, the folder of ``model-settings.json`` is searched the same way. The framework
    is imported in ``load``, so the class can be imported and pickled without it.
    """

    well_known_files: ClassVar[tuple[str, ...]] = ()

    def model_path(self) -> Path:
        """The model file to load (``FileNotFoundError`` with what was looked for)."""
        path = self.settings.resolve_uri() or self.settings.source_dir
        if path is None:
            raise FileNotFoundError(
                f"model {self.settings.name!r}: set parameters.uri to the model file"
            )
        if path.is_dir():
            for name in self.well_known_files:
                if (path / name).is_file():
                    return path / name
            raise FileNotFoundError(
                f"model {self.settings.name!r}: no model file in {path} "
                f"(looked for {', '.join(self.well_known_files)})"
            )
        if not path.is_file():
            raise FileNotFoundError(f"model {self.settings.name!r}: {path} does not exist")
        return path

    @property
    def threads(self) -> int:
        """Native threads one call may use: ``threads_per_worker``, default 1."""
        return self.settings.threads_per_worker or 1

    def wanted_outputs(self, payload: InferenceRequest, available: Sequence[str]) -> list[str]:
        """The outputs to compute: those requested, else every declared one."""
        names = payload.requested_output_names
        if names is None:
            return [spec.name for spec in self.settings.outputs] or list(available[:1])
        for name in names:
            if name not in available:
                raise BadRequest(
                    f"{type(self).__name__} {self.settings.name!r} offers the outputs "
                    f"{', '.join(map(repr, available))}; {name!r} was requested"
                )
        return names

    def respond(self, payload: InferenceRequest, values: Mapping[str, Any]) -> InferenceResponse:
        """Encode computed outputs by their requested or declared content types."""
        settings = self.settings
        return InferenceResponse(
            settings.name,
            encode_outputs(values, payload, settings),
            settings.version,
            payload.id,
        )
