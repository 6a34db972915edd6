"""``CallableModel``: serve a plain Python function.

Point ``implementation`` at a function (``"mypackage.scoring.predict"``), or use
``"v2mount.runtimes.callable.CallableModel"`` with ``parameters.function`` naming one
(``"module:function"`` or ``"module.function"``; a module that is not importable is
looked for as ``<module>.py`` next to ``model-settings.json``). In Python:
``CallableModel(name="double", function=lambda inputs: {"y": inputs["x"] * 2})``.

The function receives the decoded request (``decode_request``): a ``dict`` of input
name → array (or the object each input's content type gives), a DataFrame for a ``pd``
request, the single decoded input for an ``np`` or ``str`` request. It returns a
mapping of output name → value, a DataFrame (one output per column), one value (the
single declared output, else ``output-0``), or an ``InferenceResponse``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from v2mount.codecs.content import decode_request
from v2mount.errors import SettingsError
from v2mount.runtimes._base import FrameworkModel
from v2mount.settings import ModelSettings
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["CallableModel"]

DEFAULT_OUTPUT_NAME = "output-0"


class CallableModel(FrameworkModel):
    """A model whose ``predict`` is a function (plain, not ``async``).

    The function is imported in ``load`` (so once per worker process) and called on
    the thread that runs ``predict``; it must be thread-safe if ``parallel_workers`` is
    0 and several requests may run at once.
    """

    platform = "python"

    def __init__(
        self,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        function: Callable[[Any], Any] | str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(settings, **fields)
        target = function or (self.settings.parameters.model_extra or {}).get("function")
        if target is None:
            raise SettingsError(
                f"model {self.settings.name!r}: CallableModel needs a function "
                "(parameters.function, or implementation pointing at one)"
            )
        if not isinstance(target, str) and not callable(target):
            raise SettingsError(
                f"model {self.settings.name!r}: function {target!r} is not callable"
            )
        self._target: Callable[[Any], Any] | str = target
        self._function: Callable[[Any], Any] | None = None

    def _import(self, path: str) -> Any:
        module_name, sep, attr = path.partition(":")
        if not sep:
            module_name, _, attr = path.rpartition(".")
        if not module_name or not attr:
            raise SettingsError(f"function {path!r} must be 'module:function' or 'module.function'")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            folder = self.settings.source_dir
            file = folder / f"{module_name}.py" if folder is not None else None
            if file is None or not file.is_file():
                raise
            spec = importlib.util.spec_from_file_location(module_name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        return getattr(module, attr)

    def load(self) -> None:
        function = self._import(self._target) if isinstance(self._target, str) else self._target
        if not callable(function):
            raise TypeError(f"{self._target!r} is not callable")
        if inspect.iscoroutinefunction(function):
            raise TypeError(
                f"{self._target!r} is an async function; write a Model subclass with an "
                "async predict instead"
            )
        self._function = function

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if self._function is None:
            raise RuntimeError(f"model {self.settings.name!r} is not loaded")
        result = self._function(decode_request(payload, self.settings))
        if isinstance(result, InferenceResponse):
            return result
        if not isinstance(result, Mapping) and not hasattr(result, "columns"):
            outputs = self.settings.outputs
            result = {outputs[0].name if len(outputs) == 1 else DEFAULT_OUTPUT_NAME: result}
        return self.respond(payload, result)
