"""Every error v2mount raises, and the HTTP status each one maps to.

```
V2MountError                      base class; ``status_code`` is 500
├── BadRequest                    400 malformed body, tensor, datatype, shape, names
│   ├── PayloadTooLarge           413 body above ``max_request_bytes`` (before or after inflating)
│   ├── UnsupportedEncoding       415 a Content-Encoding other than gzip, deflate, identity
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
]


class V2MountError(Exception):
    """Base class; the message is what the client sees in ``{"error": ...}``."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(V2MountError):
    status_code = 400


class PayloadTooLarge(BadRequest):
    status_code = 413


class UnsupportedEncoding(BadRequest):
    status_code = 415


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


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` for a client; an ``OSError`` without its file name or path."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"
