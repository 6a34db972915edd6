"""OpenAPI 3.0.3 documents: the whole server, and one model with its declared tensors.

Both are built from the routes the app really serves (``include_in_schema`` ones), so
the documents cannot drift from the router: each route's operation comes from the
table below, keyed by method and template. A model's document keeps the routes under
``/v2/models/{name}`` (or ``.../versions/{version}``) with the name and version filled
in, and describes that model's inputs and outputs with a ready example request, so
"Try it out" in Swagger UI runs the real model. OpenAPI 3.0 (not 3.1) because the
Swagger UI shipped by ``swagger-ui-bundle`` (4.15) renders 3.0.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from starlette.routing import BaseRoute, Route

from v2mount.metadata import model_metadata
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import DATATYPES

__all__ = [
    "OPENAPI_VERSION",
    "documented_operations",
    "example_request",
    "model_document",
    "server_document",
]

OPENAPI_VERSION = "3.0.3"

#: Above this many elements an example request would choke the browser: none is given.
EXAMPLE_MAX_ELEMENTS = 65536

Document = dict[str, Any]

_MODEL_PREFIX = "/v2/models/{name}"
_VERSION_SEGMENT = "/versions/{version}"
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


def _ref(name: str) -> Document:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Document, description: str) -> Document:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Document:
    return _json(_ref("Error"), description)


_NOT_FOUND = _error("Unknown model, or unknown version of the model")
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PARAMETERS = _ref("Parameters")

#: An input of a request and an output of a response have the same shape.
_TENSOR: Document = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": _SHAPE,
        "datatype": _ref("Datatype"),
        "parameters": _PARAMETERS,
        "data": _ref("TensorData"),
    },
}


SCHEMAS: Document = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Parameters": {
        "type": "object",
        "description": "Free-form parameters; values are strings, numbers or booleans.",
        "additionalProperties": {
            "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]
        },
    },
    "Datatype": {"type": "string", "enum": list(DATATYPES)},
    "TensorData": {
        "type": "array",
        "description": "Elements in row-major order, flat or nested to the shape.",
        "items": {},
    },
    "MetadataServerResponse": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "MetadataTensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": _ref("Datatype"),
            "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
            "parameters": _PARAMETERS,
        },
    },
    "MetadataModelResponse": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("MetadataTensor")},
            "outputs": {"type": "array", "items": _ref("MetadataTensor")},
            "parameters": _PARAMETERS,
        },
    },
    "LiveResponse": {"type": "object", "properties": {"live": {"type": "boolean"}}},
    "ReadyResponse": {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}},
    },
    "ModelReadyResponse": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "ready": {"type": "boolean"},
            "error": {"type": "string"},
        },
    },
    "RequestInput": _TENSOR,
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": _TENSOR,
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
    "RepositoryIndexRequest": {
        "type": "object",
        "properties": {"ready": {"type": "boolean", "description": "Only list READY models."}},
    },
    "RepositoryIndexEntry": {
        "type": "object",
        "required": ["name", "state", "reason"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {
                "type": "string",
                "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"],
            },
            "reason": {"type": "string"},
        },
    },
    "RepositoryIndexResponse": {"type": "array", "items": _ref("RepositoryIndexEntry")},
    "RepositoryRequest": {"type": "object", "properties": {"parameters": _PARAMETERS}},
    "Duration": {
        "type": "object",
        "required": ["count", "ns"],
        "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}},
    },
    "ModelStatistics": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "last_inference": {"type": "integer", "description": "Milliseconds since epoch."},
            "inference_count": {"type": "integer"},
            "execution_count": {"type": "integer"},
            "inference_stats": {"type": "object", "additionalProperties": _ref("Duration")},
            "batch_stats": {"type": "array", "items": {"type": "object"}},
        },
    },
    "StatisticsResponse": {
        "type": "object",
        "required": ["model_stats"],
        "properties": {"model_stats": {"type": "array", "items": _ref("ModelStatistics")}},
    },
}

_HEADER_LENGTH = "Inference-Header-Content-Length"
_BINARY_NOTE = (
    "Binary tensor data extension: send ``application/octet-stream`` with the JSON "
    f"header first and ``{_HEADER_LENGTH}`` giving its length in bytes."
)
_BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}

_OPERATIONS: dict[tuple[str, str], Document] = {
    ("get", "/v2"): {
        "operationId": "server_metadata",
        "tags": ["server"],
        "summary": "Server metadata: name, version and protocol extensions",
        "responses": {"200": _json(_ref("MetadataServerResponse"), "Server metadata")},
    },
    ("get", "/v2/health/live"): {
        "operationId": "server_live",
        "tags": ["health"],
        "summary": "Liveness: the server answers",
        "responses": {"200": _json(_ref("LiveResponse"), "Live")},
    },
    ("get", "/v2/health/ready"): {
        "operationId": "server_ready",
        "tags": ["health"],
        "summary": "Readiness: every model is loaded",
        "responses": {
            "200": _json(_ref("ReadyResponse"), "Every model is ready"),
            "400": _json(_ref("ReadyResponse"), "Some model is not ready"),
        },
    },
    ("get", _MODEL_PREFIX + "/ready"): {
        "operationId": "model_ready",
        "tags": ["models"],
        "summary": "Readiness of one model",
        "responses": {
            "200": _json(_ref("ModelReadyResponse"), "The model is ready"),
            "400": _json(_ref("ModelReadyResponse"), "The model is not ready"),
            "404": _NOT_FOUND,
        },
    },
    ("get", _MODEL_PREFIX): {
        "operationId": "model_metadata",
        "tags": ["models"],
        "summary": "Model metadata: declared inputs and outputs",
        "responses": {
            "200": _json(_ref("MetadataModelResponse"), "Model metadata"),
            "404": _NOT_FOUND,
        },
    },
    ("post", _MODEL_PREFIX + "/infer"): {
        "operationId": "model_infer",
        "tags": ["inference"],
        "summary": "Run inference",
        "description": _BINARY_NOTE,
        "parameters": [
            {
                "name": _HEADER_LENGTH,
                "in": "header",
                "required": False,
                "description": "Length of the JSON header in a binary request body.",
                "schema": {"type": "integer", "minimum": 0},
            },
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "description": "gzip or deflate: the body is compressed (limits apply to it "
                "inflated too).",
                "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("InferenceRequest")},
                "application/octet-stream": _BINARY_BODY,
            },
        },
        "responses": {
            "200": {
                "description": "The model's outputs",
                "content": {
                    "application/json": {"schema": _ref("InferenceResponse")},
                    "application/octet-stream": _BINARY_BODY,
                },
            },
            "400": _error("Malformed request, or tensors that do not match the model"),
            "404": _NOT_FOUND,
            "413": _error("Request body too large (on the wire or once inflated)"),
            "415": _error("A Content-Encoding other than gzip, deflate or identity"),
            "500": _error("The model failed"),
            "503": _error("Model not ready, or its queue is full (see Retry-After)"),
            "504": _error("The model did not answer in time"),
        },
    },
    ("get", "/v2/models/stats"): {
        "operationId": "statistics",
        "tags": ["statistics"],
        "summary": "Inference statistics of every model",
        "responses": {"200": _json(_ref("StatisticsResponse"), "Statistics")},
    },
    ("get", _MODEL_PREFIX + "/stats"): {
        "operationId": "model_statistics",
        "tags": ["statistics"],
        "summary": "Inference statistics of one model",
        "responses": {
            "200": _json(_ref("StatisticsResponse"), "Statistics"),
            "404": _NOT_FOUND,
        },
    },
    ("post", "/v2/repository/index"): {
        "operationId": "repository_index",
        "tags": ["repository"],
        "summary": "List the models in the repository and their state",
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("RepositoryIndexRequest")}},
        },
        "responses": {
            "200": _json(_ref("RepositoryIndexResponse"), "The index"),
            "400": _error("Malformed request"),
            "403": _error("The repository extension is disabled"),
            "413": _error("Request body too large"),
        },
    },
    ("post", "/v2/repository/models/{name}/load"): {
        "operationId": "repository_load",
        "tags": ["repository"],
        "summary": "Load (or reload) every version of a model",
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("RepositoryRequest")}},
        },
        "responses": {
            "200": _json({"type": "object"}, "Loaded"),
            "400": _error("Malformed request or model name, or the model failed to load"),
            "403": _error("The repository extension is disabled"),
            "404": _error("The model is not in the repository"),
            "413": _error("Request body too large"),
        },
    },
    ("post", "/v2/repository/models/{name}/unload"): {
        "operationId": "repository_unload",
        "tags": ["repository"],
        "summary": "Unload every version of a model",
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("RepositoryRequest")}},
        },
        "responses": {
            "200": _json({"type": "object"}, "Unloaded"),
            "400": _error("Malformed request or model name"),
            "403": _error("The repository extension is disabled"),
            "404": _NOT_FOUND,
            "413": _error("Request body too large"),
        },
    },
}

_METRICS_OPERATION: Document = {
    "operationId": "metrics",
    "tags": ["metrics"],
    "summary": "Prometheus metrics",
    "responses": {
        "200": {
            "description": "Metrics in the Prometheus text format (OpenMetrics on request)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
}

_PATH_PARAMETERS = {
    "name": "Model name",
    "version": "Model version",
}


def _methods(route: Route) -> list[str]:
    return sorted(m.lower() for m in (route.methods or {"GET"}) if m != "HEAD")


def documented_operations(routes: Sequence[BaseRoute]) -> list[tuple[str, str, Route]]:
    """``(method, OpenAPI path, route)`` for every route that belongs in the schema."""
    found: list[tuple[str, str, Route]] = []
    for route in routes:
        if isinstance(route, Route) and route.include_in_schema:
            path = _PARAM.sub(r"{\1}", route.path)
            found.extend((method, path, route) for method in _methods(route))
    return found


def _operation(method: str, path: str, route: Route) -> Document:
    versioned = _VERSION_SEGMENT in path
    key = (method, path.replace(_VERSION_SEGMENT, ""))
    if key in _OPERATIONS:
        operation = copy.deepcopy(_OPERATIONS[key])
        if versioned:
            operation["operationId"] += "_version"
            operation["summary"] += " (a given version)"
    elif route.name == "metrics":
        operation = copy.deepcopy(_METRICS_OPERATION)
    else:
        operation = {
            "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "summary": route.name,
            "responses": {"200": {"description": "OK"}},
        }
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": _PATH_PARAMETERS.get(name, name),
            "schema": {"type": "string"},
        }
        for name in _PARAM.findall(path)
    ]
    if parameters:
        operation["parameters"] = parameters + operation.get("parameters", [])
    return operation


def _base(title: str, version: str, description: str, root_path: str) -> Document:
    document: Document = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
    }
    root = root_path.rstrip("/")
    if root:
        document["servers"] = [{"url": root}]
    return document


def server_document(
    routes: Sequence[BaseRoute],
    *,
    title: str,
    version: str,
    root_path: str = "",
    description: str = "",
) -> Document:
    """The OpenAPI document of every route in ``routes`` (mount prefix: ``root_path``)."""
    document = _base(
        title,
        version,
        description or "Open Inference Protocol (KServe V2) REST API.",
        root_path,
    )
    paths: Document = {}
    for method, path, route in documented_operations(routes):
        paths.setdefault(path, {})[method] = _operation(method, path, route)
    document["paths"] = paths
    document["components"] = {"schemas": copy.deepcopy(SCHEMAS)}
    return document


# -- one model ---------------------------------------------------------------------------

_JSON_ITEM = {
    "BOOL": ({"type": "boolean"}, False),
    "BYTES": ({"type": "string"}, ""),
    "FP16": ({"type": "number"}, 0.0),
    "FP32": ({"type": "number"}, 0.0),
    "FP64": ({"type": "number"}, 0.0),
}


def _item(datatype: str) -> tuple[Document, object]:
    return _JSON_ITEM.get(datatype, ({"type": "integer"}, 0))


#: BYTES example elements that the content type decodes ("" is no date, for one).
_BYTES_EXAMPLES = {"base64": "dGV4dA==", "datetime": "2024-01-01T00:00:00"}


def _example_item(spec: TensorSpec, settings: ModelSettings) -> object:
    if spec.datatype != "BYTES":
        return _item(spec.datatype)[1]
    content_type = spec.parameters.get("content_type") or settings.parameters.content_type
    return _BYTES_EXAMPLES.get(str(content_type), "")


def _example_shape(spec: TensorSpec) -> list[int]:
    return [1 if dim == -1 else dim for dim in spec.shape]


def example_request(settings: ModelSettings) -> Document | None:
    """A request the model accepts: each declared input, ``-1`` dimensions set to 1,
    zero-valued data; a small FP32 tensor when no input is declared. ``None`` when the
    declared shapes hold more than ``EXAMPLE_MAX_ELEMENTS`` elements."""
    if not settings.inputs:
        return {
            "inputs": [{"name": "input-0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]
        }
    inputs = []
    total = 0
    for spec in settings.inputs:
        shape = _example_shape(spec)
        count = math.prod(shape)
        total += count
        if total > EXAMPLE_MAX_ELEMENTS:
            return None
        zero = _example_item(spec, settings)
        inputs.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": [zero] * count}
        )
    return {"inputs": inputs}


def _tensor_schema(spec: TensorSpec, *, request: bool) -> Document:
    item, _ = _item(spec.datatype)
    rank = len(spec.shape)
    return {
        "type": "object",
        "title": spec.name,
        "required": ["name", "shape", "datatype", *(["data"] if request else [])],
        "properties": {
            "name": {"type": "string", "enum": [spec.name]},
            "shape": {
                **_SHAPE,
                "minItems": rank,
                "maxItems": rank,
                "description": f"Declared shape {spec.shape} (-1: any size).",
            },
            "datatype": {"type": "string", "enum": [spec.datatype]},
            "parameters": _PARAMETERS,
            "data": {
                "type": "array",
                "items": item,
                "description": "Elements in row-major order (flat, or nested to the shape).",
            },
        },
    }


def _one_of(schemas: list[Document]) -> Document:
    return schemas[0] if len(schemas) == 1 else {"oneOf": schemas}


def _model_schemas(settings: ModelSettings) -> Document:
    schemas: Document = {}
    if settings.inputs:
        schemas["ModelInput"] = _one_of(
            [_tensor_schema(spec, request=True) for spec in settings.inputs]
        )
    else:
        schemas["ModelInput"] = _ref("RequestInput")
    if settings.outputs:
        schemas["ModelOutput"] = _one_of(
            [_tensor_schema(spec, request=False) for spec in settings.outputs]
        )
        output_name: Document = {"type": "string", "enum": [s.name for s in settings.outputs]}
    else:
        schemas["ModelOutput"] = _ref("ResponseOutput")
        output_name = {"type": "string"}
    schemas["ModelRequestedOutput"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": output_name, "parameters": _PARAMETERS},
    }
    schemas["ModelInferenceRequest"] = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": _ref("ModelInput")},
            "outputs": {"type": "array", "items": _ref("ModelRequestedOutput")},
        },
    }
    schemas["ModelInferenceResponse"] = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string", "enum": [settings.name]},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": _ref("ModelOutput")},
        },
    }
    return schemas


def _tensor_table(title: str, specs: list[TensorSpec]) -> str:
    if not specs:
        return f"**{title}:** not declared (any accepted).\n"
    rows = "".join(f"| `{s.name}` | {s.datatype} | {s.shape} |\n" for s in specs)
    return f"**{title}:**\n\n| name | datatype | shape |\n| --- | --- | --- |\n{rows}"


def _model_description(settings: ModelSettings, versions: list[str]) -> str:
    parts = [f"Model `{settings.name}`"]
    if settings.version is not None:
        parts.append(f" version `{settings.version}`")
    if settings.platform:
        parts.append(f" (platform `{settings.platform}`)")
    text = "".join(parts) + ".\n\n"
    if versions:
        text += f"Versions served: {', '.join(f'`{v}`' for v in versions)}.\n\n"
    text += _tensor_table("Inputs", settings.inputs) + "\n"
    text += _tensor_table("Outputs", settings.outputs) + "\n"
    text += "``-1`` in a shape means any size (usually the batch dimension)."
    return text


def _specialise(
    operation: Document, path: str, settings: ModelSettings, versions: list[str]
) -> None:
    """Fill a model's concrete types and examples into a generic operation."""
    operation["parameters"] = [p for p in operation.get("parameters", []) if p["in"] != "path"]
    if not operation["parameters"]:
        del operation["parameters"]
    if path.endswith("/infer"):
        body = operation["requestBody"]["content"]["application/json"]
        body["schema"] = _ref("ModelInferenceRequest")
        example = example_request(settings)
        if example is not None:
            body["example"] = example
        answer = operation["responses"]["200"]["content"]["application/json"]
        answer["schema"] = _ref("ModelInferenceResponse")
    elif operation["operationId"].startswith("model_metadata"):
        answer = operation["responses"]["200"]["content"]["application/json"]
        answer["example"] = model_metadata(settings, versions)


def model_document(
    routes: Sequence[BaseRoute],
    settings: ModelSettings,
    *,
    versions: list[str],
    versioned: bool,
    root_path: str = "",
) -> Document:
    """The OpenAPI document of one model: its routes with name (and, when ``versioned``,
    version) filled in, typed with its declared inputs and outputs."""
    name = quote(settings.name, safe="")
    version = quote(settings.version or "", safe="")
    title = settings.name if not versioned else f"{settings.name} (version {settings.version})"
    document = _base(
        title,
        settings.version or "unversioned",
        _model_description(settings, versions),
        root_path,
    )
    paths: Document = {}
    for method, path, route in documented_operations(routes):
        if not path.startswith(_MODEL_PREFIX) or (_VERSION_SEGMENT in path) != versioned:
            continue
        operation = _operation(method, path, route)
        concrete = path.replace("{name}", name).replace("{version}", version)
        _specialise(operation, concrete, settings, versions)
        paths.setdefault(concrete, {})[method] = operation
    document["paths"] = paths
    document["components"] = {"schemas": {**copy.deepcopy(SCHEMAS), **_model_schemas(settings)}}
    return document
