"""``python -m v2mount``: ``uvicorn v2mount:app`` with flags (extra ``v2mount[server]``).

    python -m v2mount --repository examples/models --host 127.0.0.1 --port 8000

Every server setting is also a flag (``--model-parallel-workers 2``, ``--metrics-path
none``); a flag wins over its ``V2MOUNT_*`` environment variable, which wins over the
repository's ``settings.json``. ``--grpc-port 8081`` adds the gRPC service (extra
``v2mount[grpc]``), on ``--host`` unless ``--grpc-host`` says otherwise. One server
process: for several, run ``uvicorn v2mount:app --workers N`` (or gunicorn) with the
settings in the environment.

``python -m v2mount tune REPOSITORY MODEL`` measures a model and recommends its settings
(``v2mount.tuning``, docs/tuning.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from v2mount.errors import SettingsError
from v2mount.settings import Settings

__all__ = ["build_parser", "main", "settings_overrides"]

_NONE = frozenset({"", "none", "null", "off"})
#: Settings with a short flag of their own.
_ALIASES = {"model_repository": "--repository"}


def _optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _metavar(annotation: Any) -> str:
    kinds = {bool: "BOOL", int: "N", float: "SECONDS", str: "TEXT"}
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
    server.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="bind port (default: %(default)s)")
    server.add_argument(
        "--root-path", default="", help="path prefix added by a proxy in front (ASGI root_path)"
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: %(default)s)",
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
            metavar=_metavar(field.annotation),
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
    from v2mount.standalone import create_app

    overrides = settings_overrides(args)
    if "grpc_host" not in overrides and "V2MOUNT_GRPC_HOST" not in os.environ:
        overrides["grpc_host"] = args.host  # gRPC listens where REST does unless told
    try:
        app = create_app(**overrides)
    except SettingsError as exc:
        print(f"python -m v2mount: {exc.message}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("python -m v2mount needs uvicorn: pip install 'v2mount[server]'", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
        log_level=args.log_level,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
