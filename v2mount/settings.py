"""Server ``Settings`` (``V2MOUNT_*`` environment, ``settings.json``) and ``ModelSettings``.

``ModelSettings`` reads an MLServer ``model-settings.json`` unchanged: fields v2mount
does not use are ignored, fields it uses are validated, and a bad value fails at start
with the file and field named (``SettingsError``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from v2mount.errors import SettingsError
from v2mount.types import DATATYPES

__all__ = [
    "ModelParameters",
    "ModelSettings",
    "Settings",
    "TensorSpec",
    "load_model_settings",
    "load_settings",
]

MODEL_SETTINGS_FILE = "model-settings.json"
SETTINGS_FILE = "settings.json"


class TensorSpec(BaseModel):
    """A declared input or output: name, datatype, shape (``-1`` = any size)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)
    optional: bool = False

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

    model_config = ConfigDict(extra="allow")

    uri: str | None = None
    version: str | None = None
    content_type: str | None = None


class ModelSettings(BaseModel):
    """One model version's settings (MLServer ``model-settings.json`` field names).

    ``parallel_workers``, ``max_batch_size``, ``max_batch_time`` and
    ``inference_timeout`` left unset take the server-wide defaults from ``Settings``.
    """

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    name: str = Field(min_length=1)
    implementation: Any = None
    platform: str = ""
    parameters: ModelParameters = Field(default_factory=ModelParameters)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    parallel_workers: int | None = Field(default=None, ge=0)
    max_batch_size: int | None = Field(default=None, ge=0)
    max_batch_time: float | None = Field(default=None, ge=0)
    inference_timeout: float | None = Field(default=None, gt=0)
    max_queue_size: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    default_version: bool = False
    #: The folder the settings file was read from; relative ``parameters.uri`` resolve here.
    source_dir: Path | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or value in (".", ".."):
            raise ValueError(f"model name {value!r} must not contain '/' or be '.' or '..'")
        return value

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


class Settings(BaseSettings):
    """Server-wide settings; each field is also ``V2MOUNT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="V2MOUNT_", extra="ignore")

    server_name: str = "v2mount"
    server_version: str = "0.1.0"
    model_repository: Path | None = None
    load_models_at_startup: bool = True
    model_parallel_workers: int = Field(default=4, ge=0)
    model_max_batch_size: int = Field(default=0, ge=0)
    model_max_batch_time: float = Field(default=0.0, ge=0)
    model_inference_timeout: float = Field(default=60.0, gt=0)
    model_max_queue_size: int = Field(default=1024, ge=1)
    model_threads_per_worker: int = Field(default=1, ge=1)
    max_request_bytes: int = Field(default=128 * 1024 * 1024, ge=1)
    shm_threshold_bytes: int = Field(default=64 * 1024, ge=0)
    metrics_path: str | None = "/metrics"
    docs_enabled: bool = True
    repository_api_enabled: bool = True


def _format_validation(exc: ValidationError, source: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )
    return f"{source}: {problems}"


def load_model_settings(path: Path, **defaults: Any) -> ModelSettings:
    """Read one ``model-settings.json``; ``defaults`` fill fields the file leaves out."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path}: cannot read model settings: {exc}") from None
    if not isinstance(document, dict):
        raise SettingsError(f"{path}: model settings must be a JSON object")
    merged = {**defaults, **document}
    parameters = {**defaults.get("parameters", {}), **(document.get("parameters") or {})}
    merged["parameters"] = parameters
    merged["source_dir"] = path.parent
    try:
        return ModelSettings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc, str(path))) from None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, then ``settings.json`` in the repository folder.

    Keyword overrides win over the environment, which wins over the file.
    """
    try:
        settings = Settings(**overrides)
        repository = settings.model_repository
        file = repository / SETTINGS_FILE if repository is not None else None
        if file is None or not file.is_file():
            return settings
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{file}: cannot read settings: {exc}") from None
        if not isinstance(document, dict):
            raise SettingsError(f"{file}: settings must be a JSON object")
        return Settings(**{**document, **settings.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc, "settings")) from None
