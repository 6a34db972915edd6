"""``python -m v2mount``: ``uvicorn v2mount:app`` with flags (extra ``v2mount[server]``).

    python -m v2mount --repository examples/models --host 127.0.0.1 --port 8000

Every server setting is also a flag (``--model-parallel-workers 2``, ``--metrics-path
none``, ``--port`` for ``http_port``); a flag wins over its ``V2MOUNT_*`` environment
variable, which wins over the repository's ``settings.json`` (where MLServer's names
such as ``http_port`` and ``parallel_workers`` work too). ``--grpc-port 8081`` adds the
gRPC service (extra ``v2mount[grpc]``), on ``--host`` unless ``--grpc-host`` says
otherwise. One server process: for several, run ``uvicorn v2mount:app --workers N`` (or
gunicorn) with the settings in the environment. Logs go to stderr, uvicorn's and
v2mount's in one format.

``python -m v2mount tune REPOSITORY MODEL`` measures a model and recommends its settings
(``v2mount.tuning``, docs/tuning.md).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from v2mount.errors import SettingsError
from v2mount.logs import configure_logging, logging_config
from v2mount.settings import Settings, load_settings

__all__ = ["build_parser", "main", "settings_overrides"]

_NONE = frozenset({"", "none", "null", "off"})
#: Settings with a short flag of their own.
_ALIASES = {"model_repository": "--repository", "http_port": "--port"}


def _optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _metavar(name: str, annotation: Any) -> str:
    if name.endswith("_mb"):
        return "MB"
    if name.endswith(("_time", "_timeout", "_budget")):
        return "SECONDS"
    kinds = {bool: "BOOL", int: "N", float: "NUMBER", str: "TEXT"}
    for candidate in (annotation, *typing.get_args(annotation)):
        if candidate in kinds:
            return kinds[candidate]
    return "PATH"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m v2mount",
        description="Serve a model repository over the Open Inference Protocol with uvicorn.",
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--root-path", default="", help="path prefix added by a proxy in front (ASGI root_path)"
    )
    settings = parser.add_argument_group(
        "settings", "each flag is the setting of the same name (docs/settings.md)"
    )
    for name, field in Settings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if name in _ALIASES:
            flags.insert(0, _ALIASES[name])
        env = f"V2MOUNT_{name.upper()}"
        none = "; 'none' unsets it" if _optional(field.annotation) else ""
        settings.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_metavar(name, field.annotation),
            help=f"{field.description or name} (env {env}; default {field.default!r}{none})",
        )
    return parser


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, as ``Settings`` keyword arguments."""
    overrides: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        if name in vars(args):
            value: str = getattr(args, name)
            optional = _optional(field.annotation)
            overrides[name] = None if optional and value.lower() in _NONE else value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, build the app, run uvicorn until it stops; the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:
        from v2mount.tuning.cli import main as tune

        return tune(argv[1:])
    args = build_parser().parse_args(argv)
    from v2mount.standalone import build_app

    configure_logging("info")  # until the settings say otherwise
    try:
        settings = load_settings(**settings_overrides(args))
        if "grpc_host" not in settings.model_fields_set:
            # gRPC listens where REST does unless told.
            settings = settings.model_copy(update={"grpc_host": settings.host})
        app, v2app = build_app(settings)
    except SettingsError as exc:
        print(f"python -m v2mount: {exc.message}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("python -m v2mount needs uvicorn: pip install 'v2mount[server]'", file=sys.stderr)
        return 2
    settings = v2app.settings
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.http_port,
        root_path=args.root_path,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
