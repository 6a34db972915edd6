"""Logging for the standalone server: v2mount's loggers set up the way uvicorn's are.

A library mounted in someone's host configures nothing: v2mount's records (loggers
under ``v2mount``) go wherever the host's logging sends them. Only the standalone entry
points — ``uvicorn v2mount:app`` and ``python -m v2mount`` — call ``configure_logging``,
which gives the ``v2mount`` logger a stderr handler of its own, like uvicorn's own
loggers, with lines that carry the time, the level and the logger's name::

    2026-11-27 12:00:00,123 INFO:     v2mount.registry: model iris loaded: 1 worker ...
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

from v2mount.errors import V2MountError

__all__ = ["FORMAT", "configure_logging", "log_error_answer", "logging_config", "numeric_level"]

#: One format for v2mount's lines and (under ``python -m v2mount``) uvicorn's.
FORMAT = "%(asctime)s %(levelprefix)s %(name)s: %(message)s"
_PLAIN_FORMAT = "%(asctime)s %(levelname)-9s %(name)s: %(message)s"
_TRACE = 5


def numeric_level(level: str) -> int:
    """``"info"`` → ``logging.INFO``; uvicorn's ``"trace"`` is 5."""
    if level.lower() == "trace":
        return _TRACE
    value: int = logging.getLevelName(level.upper())
    return value


def _formatter() -> dict[str, Any]:
    try:
        import uvicorn.logging  # noqa: F401
    except ImportError:
        return {"format": _PLAIN_FORMAT}
    return {"()": "uvicorn.logging.DefaultFormatter", "fmt": FORMAT, "use_colors": None}


def logging_config(level: str) -> dict[str, Any]:
    """A ``dictConfig`` for uvicorn's loggers and v2mount's, all in one format.

    Given to ``uvicorn.run(log_config=...)`` by ``python -m v2mount``.
    """
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": _formatter()},
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "v2mount": {"handlers": ["default"], "level": numeric_level(level), "propagate": False},
        },
    }
    try:
        import uvicorn.config
    except ImportError:
        return config
    uvicorn_config = uvicorn.config.LOGGING_CONFIG
    access = uvicorn_config["formatters"]["access"]
    request = access["fmt"].removeprefix("%(levelprefix)s ")
    config["formatters"]["access"] = {
        **access,
        "fmt": FORMAT.replace("%(message)s", request),
    }
    config["handlers"]["access"] = uvicorn_config["handlers"]["access"]
    for name, logger in uvicorn_config["loggers"].items():
        config["loggers"][name] = {**logger, "level": numeric_level(level)}
    return config


def configure_logging(level: str) -> None:
    """Give the ``v2mount`` logger its own handler at ``level`` (standalone only).

    Leaves logging alone when the process configured it already (a handler on the
    root logger or on ``v2mount``), as under gunicorn with a ``--log-config``.
    """
    package = logging.getLogger("v2mount")
    if logging.getLogger().handlers or package.handlers:
        package.setLevel(numeric_level(level))
        return
    config = logging_config(level)
    config["loggers"] = {"v2mount": config["loggers"]["v2mount"]}
    config["formatters"] = {"default": config["formatters"]["default"]}
    config["handlers"] = {"default": config["handlers"]["default"]}
    logging.config.dictConfig(config)


_answers = logging.getLogger("v2mount.rest")


def log_error_answer(
    exc: V2MountError, method: str, path: str, *, client_errors_at_info: bool = False
) -> None:
    """The log line for an error answer, with its reason and the request id.

    5xx at WARNING; 4xx at DEBUG, or INFO with the ``log_client_errors`` setting (a
    client's mistake is not the server's problem, but an operator may want to see it).
    """
    if exc.status_code >= 500:
        level = logging.WARNING
    else:
        level = logging.INFO if client_errors_at_info else logging.DEBUG
    if _answers.isEnabledFor(level):
        _answers.log(
            level,
            "%s %s answered %d (request id %s): %s",
            method,
            path,
            exc.status_code,
            exc.request_id or "-",
            exc.message,
        )
