"""Sending the unloaded model to a worker: dill bytes, plus the files of modules it needs.

dill sends classes defined in ``__main__`` by value, and every other class by reference
(module and name), which the worker then imports. A model class whose module a fresh
interpreter cannot import (a test module under pytest's ``importlib`` import mode, a
file loaded with ``spec_from_file_location``) travels as ``(module name, file)`` and the
worker executes that file under the same name before unpickling the model.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import dill

from v2mount.model import Model, preload_modules

__all__ = ["ModelPackage", "pack_model", "unpack_model"]


@dataclass(frozen=True)
class ModelPackage:
    data: bytes
    #: ``(module name, file)`` for modules to execute in the worker before unpickling.
    modules: tuple[tuple[str, str], ...]
    #: Modules the template imports before forking (``preload_modules``); workers do not.
    preload: tuple[str, ...] = ()


def _importable(name: str) -> bool:
    """Whether a fresh interpreter with this ``sys.path`` finds ``name`` (sys.modules aside)."""
    if name == "__main__":
        return True  # dill sends what it defines by value
    top = name.partition(".")[0]
    if top in sys.builtin_module_names:
        return True
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            if find_spec(top, None) is not None:
                return True
        except Exception:
            continue
    return False


def pack_model(model: Model) -> ModelPackage:
    """Called in the parent (raises whatever dill raises for an unpicklable model)."""
    modules: list[tuple[str, str]] = []
    for cls in reversed(type(model).__mro__):
        module = sys.modules.get(cls.__module__)
        file = getattr(module, "__file__", None)
        entry = (cls.__module__, str(file))
        if file is not None and entry not in modules and not _importable(cls.__module__):
            modules.append(entry)
    return ModelPackage(dill.dumps(model, recurse=True), tuple(modules), preload_modules(model))


def unpack_model(package: ModelPackage) -> Model:
    """Called in the worker: execute the shipped modules, then unpickle the model."""
    for name, file in package.modules:
        if name in sys.modules:
            continue
        parts = name.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent not in sys.modules:
                stub = types.ModuleType(parent)
                stub.__path__ = []
                sys.modules[parent] = stub
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load module {name!r} from {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    model: Model = dill.loads(package.data)
    return model
