"""Every manifest under docs/deploy/ validates against the schema of the kind it declares.

Core kinds (Deployment, Service, HorizontalPodAutoscaler …) go through
``kubernetes-validate``, which ships Kubernetes' own schemas, in strict mode (unknown
fields are errors). KServe kinds go through KServe 0.20's CRD schemas copied into
``kserve_schemas/`` (see its README), closed the way ``kubectl apply`` with strict field
validation closes them: a field the schema does not name is an error, as is a repeated
key in a list the schema declares a map (``x-kubernetes-list-map-keys``). Their metadata
is checked as Kubernetes' ``ObjectMeta``. A kind with no schema fails too, so no file
found under docs/deploy/ escapes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
KSERVE_SCHEMAS = Path(__file__).resolve().parent / "kserve_schemas"
KSERVE_GROUP = "serving.kserve.io"
#: Files under docs/deploy/ that are not Kubernetes manifests (checked elsewhere).
NOT_MANIFESTS = {"Dockerfile"}


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def documents() -> Iterator[tuple[str, int, dict[str, Any]]]:
    for path in manifest_files():
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                yield path.name, index, document


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others."""
    if isinstance(schema, dict):
        closed = {key: _closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            closed["additionalProperties"] = False
        if "properties" in schema:
            closed["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        return closed
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


def _unique_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: set[tuple[Any, ...]] = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(name) for name in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry with {dict(zip(keys, key, strict=True))}"
                )
            seen.add(key)


KServeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _unique_map_keys}
)


@cache
def kserve_validator(kind: str, api_version: str) -> Any:
    version = api_version.partition("/")[2]
    path = KSERVE_SCHEMAS / f"{kind.lower()}-{version}.json"
    if not path.is_file():
        return None
    return KServeValidator(_closed(json.loads(path.read_text())))


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(root)"


def schema_errors(document: dict[str, Any]) -> list[str]:
    """What a cluster with KServe installed would reject in ``document`` (empty: nothing)."""
    api_version, kind = document.get("apiVersion", ""), document.get("kind", "")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not kind:
        return ["apiVersion and kind must be strings"]
    if api_version.partition("/")[0] == KSERVE_GROUP:
        validator = kserve_validator(kind, api_version)
        if validator is None:
            return [f"no KServe schema for {kind} {api_version}"]
        errors = [f"{_where(e)}: {e.message}" for e in validator.iter_errors(document)]
        # KServe's schemas leave metadata open; the API server checks it as ObjectMeta.
        wrapped = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document.get("metadata")}
        return errors + [f"metadata: {e}" for e in schema_errors(wrapped)]
    try:
        kubernetes_validate.validate(document, latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_where(exc)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def test_every_file_under_docs_deploy_is_validated() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    validated = {p.relative_to(DEPLOY).as_posix() for p in manifest_files()}
    assert names - validated == NOT_MANIFESTS
    kinds = {document["kind"] for _, _, document in documents()}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "InferenceService"}
    assert expected | {"ServingRuntime", "ClusterServingRuntime"} <= kinds


@pytest.mark.parametrize(
    ("name", "index", "document"),
    [pytest.param(*entry, id=f"{entry[0]}#{entry[1]}") for entry in documents()],
)
def test_manifest_validates_against_its_schema(
    name: str, index: int, document: dict[str, Any]
) -> None:
    assert schema_errors(document) == []


def _document(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for _, _, d in documents() if d["kind"] == kind))


def _broken_runtime_field() -> dict[str, Any]:
    document = _document("ClusterServingRuntime")
    document["spec"]["protocolVersion"] = document["spec"].pop("protocolVersions")
    return document


def _runtime_without_containers() -> dict[str, Any]:
    document = _document("ServingRuntime")
    del document["spec"]["containers"]
    return document


def _runtime_bad_priority() -> dict[str, Any]:
    document = _document("ServingRuntime")
    document["spec"]["supportedModelFormats"][0]["priority"] = 0
    return document


def _runtime_duplicate_env() -> dict[str, Any]:
    document = _document("ClusterServingRuntime")
    env = document["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    return document


def _service_bad_storage() -> dict[str, Any]:
    document = _document("InferenceService")
    document["spec"]["predictor"]["model"]["storageUri"] = ["s3://models/iris"]
    return document


def _kserve_bad_metadata() -> dict[str, Any]:
    document = _document("InferenceService")
    document["metadata"]["labels"] = ["iris"]
    return document


def _deployment_bad_replicas() -> dict[str, Any]:
    document = _document("Deployment")
    document["spec"]["replicas"] = "two"
    return document


def _deployment_unknown_field() -> dict[str, Any]:
    document = _document("Deployment")
    document["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    return document


def _hpa_without_target() -> dict[str, Any]:
    document = _document("HorizontalPodAutoscaler")
    del document["spec"]["scaleTargetRef"]
    return document


def _unknown_kserve_kind() -> dict[str, Any]:
    document = _document("ServingRuntime")
    document["kind"] = "ServingRuntimes"
    return document


def _unknown_core_kind() -> dict[str, Any]:
    document = _document("Service")
    document["kind"] = "Servce"
    return document


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (_broken_runtime_field, "'protocolVersion' was unexpected"),
        (_runtime_without_containers, "'containers' is a required property"),
        (_runtime_bad_priority, "less than the minimum of 1"),
        (_runtime_duplicate_env, "duplicate entry with {'name': 'V2MOUNT_MODEL_PARALLEL"),
        (_service_bad_storage, "is not of type 'string'"),
        (_kserve_bad_metadata, "metadata: metadata.labels"),
        (_deployment_bad_replicas, "spec.replicas: 'two' is not of type"),
        (_deployment_unknown_field, "'readinesProbe' was unexpected"),
        (_hpa_without_target, "'scaleTargetRef' is a required property"),
        (_unknown_kserve_kind, "no KServe schema for ServingRuntimes"),
        (_unknown_core_kind, "Couldn't find schema for kind Servce"),
    ],
)
def test_a_broken_manifest_is_rejected(broken: Any, message: str) -> None:
    errors = schema_errors(broken())
    assert any(message in error for error in errors), errors
