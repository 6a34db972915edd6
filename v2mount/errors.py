"""Every error v2mount raises, and the HTTP status each one maps to.

```
V2MountError                      base class; ``status_code`` is 500
├── BadRequest                    400 malformed body, tensor, datatype, shape, names
│   ├── PayloadTooLarge           413 body above ``max_request_bytes``
│   └── HeadersTooLarge           431 headers above ``max_header_bytes``
├── ModelNotFound                 404 unknown model, or unknown version of a known model
├── ModelNotReady                 503 model known but not loaded (or failed to load)
├── RepositoryDisabled            403 repository extension switched off
├── Overloaded                    503 + ``Retry-After``: a model's queue is full
├── InferenceTimeout              504 a request outlived ``inference_timeout``
├── ModelError                    500 the model's own code raised (message kept, no traceback)
├── BrokenWorker                  500 a worker process died while holding the request
└── SettingsError                 raised at start-up: a bad settings file or field
```

``error_status`` and ``error_headers`` are the one place where an exception becomes
an HTTP answer.
"""

from __future__ import annotations

import re

__all__ = [
    "BadRequest",
    "BrokenWorker",
    "HeadersTooLarge",
    "InferenceTimeout",
    "ModelError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RepositoryDisabled",
    "SettingsError",
    "V2MountError",
    "describe_exception",
    "hide_paths",
]


class V2MountError(Exception):
    """Base class; the message is what the client sees in ``{"error": ...}``.

    ``request_id`` is the id of the inference request that failed, once known (logs).
    """

    status_code = 500
    request_id: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(V2MountError):
    status_code = 400


class PayloadTooLarge(BadRequest):
    status_code = 413


class HeadersTooLarge(BadRequest):
    status_code = 431


class ModelNotFound(V2MountError):
    status_code = 404


class ModelNotReady(V2MountError):
    """``retry_after`` (seconds) is set when readiness is expected back soon."""

    status_code = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class RepositoryDisabled(V2MountError):
    status_code = 403


class Overloaded(V2MountError):
    status_code = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class InferenceTimeout(V2MountError):
    status_code = 504


class ModelError(V2MountError):
    status_code = 500


class BrokenWorker(V2MountError):
    status_code = 500


class SettingsError(V2MountError):
    """A settings file or field is wrong; raised at start-up, never sent to a client."""


#: An absolute path (POSIX, or Windows with a drive letter) inside a message.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\])(?:/|[A-Za-z]:\\)[^\s'\"`,;:()<>]*")


def _hide_path(match: re.Match[str]) -> str:
    path = match.group().rstrip("/\\")
    last = re.split(r"[/\\]", path)[-1]
    return f".../{last}" if last else "..."


def hide_paths(text: str) -> str:
    """``text`` with every absolute path cut to ``.../<last component>``."""
    return _ABSOLUTE_PATH.sub(_hide_path, text)


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` for a client, with no absolute path in it.

    The one sanitising rule for every text that leaves the server from a model's own
    code (load and predict errors, in-process and in workers): an ``OSError`` keeps its
    ``strerror`` and its file's last component, and any absolute path left in a message
    is cut to ``.../<last component>`` (``hide_paths``, which the registry also applies
    to every reason a worker pool reports). The full text goes to the log.
    """
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text = f"{text}: {str(exc.filename)!r}"
    else:
        text = str(exc)
    return f"{type(exc).__name__}: {hide_paths(text)}"
