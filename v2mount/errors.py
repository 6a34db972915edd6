"""Every error v2mount raises, and the HTTP status and gRPC status code each maps to.

```
V2MountError                      base class; 500, INTERNAL
├── BadRequest                    400 INVALID_ARGUMENT malformed body, tensor, datatype, shape
│   ├── PayloadTooLarge           413 RESOURCE_EXHAUSTED body above ``max_request_bytes``
│   ├── UnsupportedEncoding       415 INVALID_ARGUMENT a Content-Encoding not gzip/deflate
│   └── HeadersTooLarge           431 INVALID_ARGUMENT headers above ``max_header_bytes``
├── ModelNotFound                 404 NOT_FOUND unknown model, or unknown version of a model
├── ModelNotReady                 503 UNAVAILABLE model known but not loaded (or failed to)
├── RepositoryDisabled            403 PERMISSION_DENIED repository extension switched off
├── Overloaded                    503 + ``Retry-After``, RESOURCE_EXHAUSTED: queue full
├── InferenceTimeout              504 DEADLINE_EXCEEDED outlived ``inference_timeout``
├── ModelError                    500 INTERNAL the model's own code raised (no traceback)
├── BrokenWorker                  500 INTERNAL a worker process died holding the request
└── SettingsError                 raised at start-up: a bad settings file or field
```

``status_code`` and ``headers()`` are the one place where an exception becomes an HTTP
answer; ``grpc_code`` (a ``grpc.StatusCode`` member name, as Triton uses them) the one
place where it becomes a gRPC status.
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
    "UnsupportedEncoding",
    "V2MountError",
    "describe_exception",
    "hide_paths",
]


class V2MountError(Exception):
    """Base class; the message is what the client sees in ``{"error": ...}``.

    ``request_id`` is the id of the inference request that failed, once known (logs).
    """

    status_code = 500
    grpc_code = "INTERNAL"
    request_id: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(V2MountError):
    status_code = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(BadRequest):
    status_code = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedEncoding(BadRequest):
    status_code = 415


class HeadersTooLarge(BadRequest):
    status_code = 431


class ModelNotFound(V2MountError):
    status_code = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(V2MountError):
    """``retry_after`` (seconds) is set when readiness is expected back soon."""

    status_code = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class RepositoryDisabled(V2MountError):
    status_code = 403
    grpc_code = "PERMISSION_DENIED"


class Overloaded(V2MountError):
    status_code = 503
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class InferenceTimeout(V2MountError):
    status_code = 504
    grpc_code = "DEADLINE_EXCEEDED"


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
