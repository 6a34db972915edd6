"""Server ``Settings`` (``V2MOUNT_*`` environment, ``settings.json``) and ``ModelSettings``.

``ModelSettings`` reads an MLServer ``model-settings.json`` unchanged, and ``Settings``
an MLServer ``settings.json``: MLServer's names mean what they mean there where v2mount
has the same notion (``parallel_workers``, ``http_port``, ``debug``...), the MLServer
fields v2mount does not use are listed once as ignored, and a field neither knows is
reported with its file and a "did you mean" (``Notice``), never silently dropped. A
bad value fails at start with the file and field named (``SettingsError``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from v2mount.errors import SettingsError
from v2mount.types import DATATYPES

__all__ = [
    "BatchingSettings",
    "ModelParameters",
    "ModelSettings",
    "Notice",
    "RayActorOptions",
    "Settings",
    "TensorSpec",
    "load_model_settings",
    "load_settings",
    "usable_cores",
]

logger = logging.getLogger("v2mount.settings")

MODEL_SETTINGS_FILE = "model-settings.json"
SETTINGS_FILE = "settings.json"


class TensorSpec(BaseModel):
    """A declared input or output: name, datatype, shape (``-1`` = any size)."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """Tensor name, as the client sends it."""
    datatype: str
    """One of the OIP datatypes (BOOL, UINT8 … FP64, BYTES)."""
    shape: list[int]
    """Dimensions; ``-1`` marks a variable one (usually the batch)."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Free-form parameters shown in metadata (``content_type`` among them)."""
    optional: bool = False
    """An input the client may leave out."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; expected one of {', '.join(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(dim < -1 for dim in value):
            raise ValueError("dimensions must be -1 (variable) or non-negative")
        return value


class ModelParameters(BaseModel):
    """MLServer's ``parameters`` block; unknown keys are kept for the model to read."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    uri: str | None = None
    """Artefact path; relative paths resolve against the settings file's folder."""
    version: str | None = None
    """This model version's name (versions may also be numbered subfolders)."""
    content_type: str | None = None
    """Default content type for decoding the request (``np``, ``str``, ``pd`` …)."""


class BatchingSettings(BaseModel):
    """v2mount's ``batching`` block: how batches are timed (see docs/adaptive-batching.md).

    Present (even empty): at most one batch in flight per worker, and a batch goes at
    once when a worker is free and nothing else is expected in time. With ``slo_ms``:
    predictive batching under that latency target, with admission control.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    slo_ms: float | None = Field(default=None, gt=0)
    """Latency target per request in the batcher and model, in ms: batches are timed
    from a fitted cost model to meet it (``max_batch_time`` is then unused); unset: a
    fixed window of ``max_batch_time``."""
    max_wait_ms: float | None = Field(default=None, ge=0)
    """With ``slo_ms``: the longest the oldest request of a batch waits for company, in
    ms; unset: as long as the SLO allows."""
    admission: bool = True
    """With ``slo_ms``: answer 503 + ``Retry-After`` at once to a request predicted to
    miss its SLO."""
    idle_dispatch: bool = True
    """Without ``slo_ms``: send a batch before ``max_batch_time`` when a worker is free
    and the next request is not expected before then."""
    min_samples: int = Field(default=8, ge=2)
    """Batches to measure before the cost model is trusted (until then, no waiting)."""
    window: int = Field(default=16, ge=1)
    """Batches the cost model keeps per size class (1, 2-3, 4-7 ... rows)."""


class RayActorOptions(BaseModel):
    """Where Ray places each actor of a model with ``pool_backend: "ray"`` (Ray's names)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    num_cpus: float = Field(default=1, ge=0)
    """CPUs reserved per actor."""
    num_gpus: float = Field(default=0, ge=0)
    """GPUs reserved per actor (fractions share a GPU)."""
    memory: int | None = Field(default=None, ge=0)
    """Bytes of memory reserved per actor (scheduling only, not a limit)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, e.g. ``{"accelerator_a": 1}``."""

    def ray_options(self) -> dict[str, Any]:
        """The keyword arguments for Ray's ``.options()``."""
        return self.model_dump(exclude_none=True)


class ModelSettings(BaseModel):
    """One model version's settings (MLServer ``model-settings.json`` field names).

    ``parallel_workers``, ``max_batch_size``, ``max_batch_time`` and
    ``inference_timeout`` left unset take the server-wide defaults from ``Settings``.
    """

    model_config = ConfigDict(
        extra="ignore", arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    name: str = Field(min_length=1)
    """Model name in URLs; defaults to the folder name (no ``/``)."""
    implementation: Any = None
    """Dotted path of the ``Model`` subclass (MLServer runtime names map to ours)."""
    platform: str = ""
    """Informational ``platform`` string in the model metadata."""
    parameters: ModelParameters = Field(default_factory=ModelParameters)
    """MLServer's parameters block: ``uri``, ``version``, ``content_type``, extras."""
    inputs: list[TensorSpec] = Field(default_factory=list)
    """Declared inputs; requests are validated against them when present."""
    outputs: list[TensorSpec] = Field(default_factory=list)
    """Declared outputs; responses are cast to their datatypes."""
    parallel_workers: int | None = Field(default=None, ge=0)
    """Worker processes for this model (0: in the main process); unset: server default."""
    max_batch_size: int | None = Field(default=None, ge=0)
    """Adaptive batching: rows per batch (≤ 1: off); unset: server default."""
    max_batch_time: float | None = Field(default=None, ge=0)
    """Adaptive batching: seconds the oldest request may wait; unset: server default."""
    batching: BatchingSettings | None = None
    """v2mount only: predictive batching under a latency SLO, or a fixed window that
    sends early when idle (``BatchingSettings``); unset: the plain fixed window."""
    inference_timeout: float | None = Field(default=None, gt=0)
    """Seconds before a request gets 504; unset: server default."""
    max_queue_size: int | None = Field(default=None, ge=1)
    """Requests that may wait for this model before 503; unset: server default."""
    threads_per_worker: int | None = Field(default=None, ge=1)
    """Native thread pools (BLAS, OpenMP, ONNX Runtime) per worker; unset: default."""
    preload: list[str] = Field(default_factory=list)
    """Modules (dotted names) the pool's template imports before forking workers, on top
    of those the model class declares; what ``load`` imports, so replacements start fast."""
    max_requests_per_worker: int | None = Field(default=None, ge=0)
    """Recycle a worker after this many requests (0: never); unset: server default."""
    max_worker_memory_mb: float | None = Field(default=None, ge=0)
    """Recycle a worker whose RSS passes this many MB (0: never); unset: server default."""
    pool: str | None = Field(default=None, min_length=1)
    """Shared pool: models naming the same pool share one set of worker processes, each
    worker loading every model of the pool (MLServer's ``parameters.inference_pool_gid``
    means the same); unset: the server's ``default_pool``; ``null``: a pool of its own."""
    pool_backend: Literal["process", "ray"] | None = None
    """What runs the ``parallel_workers``: local processes or Ray actors; unset: default."""
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    """``pool_backend: "ray"``: resources each actor is placed by (num_cpus, num_gpus …)."""
    default_version: bool = False
    """Serve this version for requests that name no version (else the latest)."""
    source_dir: Path | None = None
    """Set by the loader: the folder the settings file was read from."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or value in (".", ".."):
            raise ValueError(f"model name {value!r} must not contain '/' or be '.' or '..'")
        return value

    @field_validator("preload")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"preload: {name!r} is not a module name (such as 'sklearn.svm')")
        return value

    @model_validator(mode="before")
    @classmethod
    def _inference_pool_gid(cls, data: Any) -> Any:
        """MLServer's ``parameters.inference_pool_gid`` names the shared pool (``pool`` wins)."""
        if isinstance(data, dict):
            parameters = data.get("parameters")
            gid = parameters.get("inference_pool_gid") if isinstance(parameters, dict) else None
            if gid is not None and "pool" not in data:
                data = {**data, "pool": gid}
        return data

    @model_validator(mode="after")
    def _batching_needs_batches(self) -> ModelSettings:
        if self.batching is not None and self.max_batch_size is not None:
            if self.max_batch_size <= 1:
                raise ValueError("a batching block needs max_batch_size > 1")
        return self

    @property
    def version(self) -> str | None:
        return self.parameters.version

    def resolve_uri(self) -> Path | None:
        """``parameters.uri`` as a path, relative to the settings file's folder."""
        uri = self.parameters.uri
        if uri is None:
            return None
        path = Path(uri)
        if not path.is_absolute() and self.source_dir is not None:
            path = self.source_dir / path
        return path


#: Log levels, uvicorn's names.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Server-wide settings; each field is also ``V2MOUNT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="V2MOUNT_", extra="ignore", use_attribute_docstrings=True
    )

    server_name: str = "v2mount"
    """``name`` in the server metadata."""
    server_version: str = "0.1.0"
    """``version`` in the server metadata."""
    model_repository: Path | None = None
    """Folder scanned for ``model-settings.json`` files."""
    route_prefix: str = ""
    """Standalone server only: serve every route under this path (e.g. ``/ml``)."""
    host: str = "127.0.0.1"
    """``python -m v2mount`` only: the address to bind (under uvicorn: its ``--host``)."""
    http_port: int = Field(default=8000, ge=0, le=65535)
    """``python -m v2mount`` only: the port to bind (under uvicorn: its ``--port``)."""
    log_level: str = "info"
    """Standalone server only (``critical`` … ``debug``, ``trace``): v2mount's and uvicorn's
    log level. Mounted in a host, v2mount leaves logging to the host."""
    log_client_errors: bool = False
    """Log each 4xx answer with its reason and request id at INFO (else at DEBUG)."""
    model_parallel_workers: int = Field(default=1, ge=0)
    """Default worker processes per model (0: inference in the main process), as in
    MLServer; lowered to the cores this process may use. A model's own
    ``parallel_workers`` is taken as written."""
    model_max_batch_size: int = Field(default=0, ge=0)
    """Default adaptive-batching rows per batch (≤ 1: batching off)."""
    model_max_batch_time: float = Field(default=0.0, ge=0)
    """Default seconds the oldest request of a batch may wait."""
    model_inference_timeout: float = Field(default=60.0, gt=0)
    """Default seconds before an inference gets 504 (a stuck worker is replaced at twice that)."""
    model_max_queue_size: int = Field(default=1024, ge=1)
    """Default requests that may wait per model before 503 + ``Retry-After``."""
    model_threads_per_worker: int = Field(default=1, ge=1)
    """Default native threads (BLAS, OpenMP, ONNX Runtime) in each worker process."""
    model_max_requests_per_worker: int = Field(default=0, ge=0)
    """Default requests after which a worker is replaced, like gunicorn's max_requests
    (0: never). The successor loads first, so the model stays ready."""
    model_max_worker_memory_mb: float = Field(default=0, ge=0)
    """Default RSS in MB above which a worker is replaced after its request (0: never)."""
    pool_backend: Literal["process", "ray"] = "process"
    """Default worker pool of models: local processes, or Ray actors (extra ``v2mount[ray]``)."""
    default_pool: str | None = Field(default=None, min_length=1)
    """Shared pool of every model with worker processes that names none (``pool``): one
    set of workers loads them all, as MLServer's default inference pool; unset: a pool
    per model. Not with ``pool_backend: "ray"``."""
    ray_address: str | None = None
    """Ray cluster the ``ray`` pools join (``auto``, ``ray://host:10001``); unset: a local
    Ray is started, unless the host process already initialised Ray."""
    inline_predict_budget: float = Field(default=0.001, ge=0)
    """In-process models: a plain predict averaging under this many seconds runs on the
    event loop, not a worker thread (the hop costs more); 0 always uses the thread. Such
    predicts also take about this long of each turn of the loop at most (more requests
    wait for the next turns, in line), so sockets are polled between them."""
    compress_responses: bool = True
    """Compress inference answers of 1 KiB or more with gzip or deflate when the request's
    ``Accept-Encoding`` allows it; false: never (a proxy in front compresses, or CPU
    matters more than bandwidth). MLServer's ``gzip_enabled``."""
    gc_freeze: bool | None = None
    """Once the models have loaded, move every object then alive out of the garbage
    collector's sight (``gc.freeze()``): a full collection with a framework loaded
    scans ≈ 10^5 objects (≈ 100 ms with scikit-learn) and stalls every request in
    flight, and after the freeze it scans only what came later. Unset: on in the
    standalone server, off mounted in a host (it acts on the whole process)."""
    max_request_bytes: int = Field(default=128 * 1024 * 1024, ge=1)
    """Largest request body accepted; larger ones get 413."""
    max_header_bytes: int = Field(default=64 * 1024, ge=1)
    """Largest total size of a request's headers; larger ones get 431."""
    shm_threshold_bytes: int = Field(default=64 * 1024, ge=0)
    """Arrays at least this large cross to workers by shared memory, not the pipe."""
    metrics_path: str | None = "/metrics"
    """Path of the Prometheus endpoint; empty or null turns it off."""
    docs_enabled: bool = True
    """Serve Swagger UI at ``/v2/docs`` and per model."""
    repository_api_enabled: bool = True
    """Serve the model repository extension (index, load, unload)."""
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve the OIP gRPC service on this port too (extra ``v2mount[grpc]``; 0: any
    free port); unset: no gRPC. It listens beside the ASGI server, never inside it."""
    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (``0.0.0.0`` or ``[::]`` for every interface)."""
    grpc_max_message_length: int | None = Field(default=None, ge=1)
    """Largest gRPC message received or sent, in bytes; unset: ``max_request_bytes``."""
    grpc_ssl_certfile: Path | None = None
    """PEM certificate chain: gRPC over TLS (needs ``grpc_ssl_keyfile``)."""
    grpc_ssl_keyfile: Path | None = None
    """PEM private key of ``grpc_ssl_certfile``."""
    grpc_ssl_ca_certs: Path | None = None
    """PEM root certificates: gRPC clients must present a certificate they signed."""
    grpc_reuse_port: bool = False
    """Let several processes (``uvicorn --workers``) share ``grpc_port`` (SO_REUSEPORT);
    off, a port another process holds fails start-up."""
    grpc_shutdown_grace: float = Field(default=5.0, ge=0)
    """Seconds in-flight gRPC calls get to finish at shutdown before they are cancelled."""

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError("must start with '/' and not end with '/'")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value

    @model_validator(mode="after")
    def _default_pool_needs_processes(self) -> Settings:
        if self.default_pool is not None and self.pool_backend == "ray":
            raise ValueError(
                'default_pool: shared pools run local processes, not pool_backend "ray"'
            )
        return self

    def default_workers(self) -> int:
        """Worker processes for a model that sets none: the default, at most the cores."""
        return min(self.model_parallel_workers, usable_cores())


@dataclass(frozen=True, slots=True)
class Notice:
    """Something reading settings found that is worth a log line but not an error."""

    level: int
    message: str
    #: For the notice listing MLServer fields v2mount ignores: those fields.
    ignored: tuple[str, ...] = ()

    def log(self) -> None:
        logger.log(self.level, "%s", self.message)


#: MLServer ``model-settings.json`` fields v2mount does not use.
MLSERVER_MODEL_FIELDS = frozenset({"cache_enabled", "versions", "warm_workers"})
#: MLServer ``settings.json`` names → the v2mount setting that means the same.
MLSERVER_SERVER_NAMES = {
    "parallel_workers": "model_parallel_workers",
    "model_repository_root": "model_repository",
    "metrics_endpoint": "metrics_path",
    "gzip_enabled": "compress_responses",
}
#: MLServer ``settings.json`` fields v2mount does not use (``debug`` is read apart).
MLSERVER_SERVER_FIELDS = frozenset(
    {
        "cache_enabled",
        "cache_size",
        "cors_settings",
        "environments_dir",
        "extensions",
        "kafka_enabled",
        "kafka_servers",
        "kafka_topic_input",
        "kafka_topic_output",
        "load_models_at_startup",
        "logging_settings",
        "metrics_dir",
        "metrics_port",
        "metrics_rest_server_prefix",
        "model_repository_implementation",
        "model_repository_implementation_args",
        "parallel_workers_timeout",
        "root_path",
        "tracing_server",
        "use_structured_logging",
    }
)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_fields(
    document: Mapping[str, Any],
    known: Iterable[str],
    mlserver: Iterable[str],
    source: str,
) -> list[Notice]:
    """Notices for the unknown fields of a settings document, and the ignored ones."""
    known, mlserver = set(known), set(mlserver)
    notices: list[Notice] = []
    ignored = sorted(name for name in document if name in mlserver and name not in known)
    for name in document:
        if name not in known and name not in mlserver:
            hint = did_you_mean(name, known | mlserver)
            notices.append(Notice(logging.WARNING, f"{source}: unknown field {name!r}{hint}"))
    if ignored:
        notices.append(
            Notice(
                logging.INFO,
                f"{source}: MLServer fields v2mount does not use, ignored: {', '.join(ignored)}",
                tuple(ignored),
            )
        )
    return notices


def _format_validation(exc: ValidationError, source: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )
    return f"{source}: {problems}"


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{source}: cannot read the file: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SettingsError(f"{source}: must be a JSON object")
    return document


def load_model_settings(
    path: Path, *, notices: list[Notice] | None = None, source: str | None = None, **defaults: Any
) -> ModelSettings:
    """Read one ``model-settings.json``; ``defaults`` fill fields the file leaves out.

    Unknown and ignored fields are appended to ``notices`` (when given); messages name
    the file as ``source`` (default: its path).
    """
    source = source or str(path)
    document = _read_json(path, source)
    if notices is not None:
        known = set(ModelSettings.model_fields) - {"source_dir"}
        notices += _check_fields(document, known, MLSERVER_MODEL_FIELDS, source)
        for kind in ("inputs", "outputs"):
            entries = document.get(kind)
            for index, entry in enumerate(entries if isinstance(entries, list) else []):
                if isinstance(entry, dict):
                    where = f"{source}: {kind}[{index}]"
                    notices += _check_fields(entry, TensorSpec.model_fields, (), where)
    merged = {**defaults, **document}
    parameters = {**defaults.get("parameters", {}), **(document.get("parameters") or {})}
    merged["parameters"] = parameters
    merged["source_dir"] = path.parent
    try:
        return ModelSettings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc, source)) from None


def _environment_notices() -> list[Notice]:
    prefix = "V2MOUNT_"
    known = {name.upper() for name in Settings.model_fields}
    return [
        Notice(
            logging.WARNING,
            f"environment: unknown variable {variable!r}"
            + did_you_mean(variable, {prefix + name for name in known}),
        )
        for variable in sorted(os.environ)
        if variable.upper().startswith(prefix) and variable[len(prefix) :].upper() not in known
    ]


def _translate_mlserver(document: dict[str, Any]) -> dict[str, Any]:
    """An MLServer ``settings.json`` in v2mount's names (v2mount's own names win)."""
    translated = dict(document)
    for theirs, ours in MLSERVER_SERVER_NAMES.items():
        if theirs in translated:
            value = translated.pop(theirs)
            translated.setdefault(ours, value)
    if translated.pop("debug", False) is True:
        translated.setdefault("log_level", "debug")
    return translated


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, then ``settings.json`` in the repository folder.

    Keyword overrides win over the environment, which wins over the file. An unknown
    keyword is a ``SettingsError``; unknown fields of the file and unknown ``V2MOUNT_*``
    variables are logged as warnings.
    """
    unknown = [name for name in overrides if name not in Settings.model_fields]
    if unknown:
        raise SettingsError(
            "; ".join(
                f"unknown setting {name!r}{did_you_mean(name, Settings.model_fields)}"
                for name in unknown
            )
        )
    notices = _environment_notices()
    try:
        settings = Settings(**overrides)
        repository = settings.model_repository
        file = repository / SETTINGS_FILE if repository is not None else None
        if file is not None and file.is_file():
            document = _read_json(file, str(file))
            known = set(Settings.model_fields) | set(MLSERVER_SERVER_NAMES) | {"debug"}
            notices += _check_fields(document, known, MLSERVER_SERVER_FIELDS, str(file))
            document = {k: v for k, v in _translate_mlserver(document).items() if k in known}
            settings = Settings(**{**document, **settings.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc, "settings")) from None
    for notice in notices:
        notice.log()
    return settings
