"""A model's declared metadata: the metadata document, and requests checked against it."""

from __future__ import annotations

from typing import Any

from v2mount.codecs.tensor import cast_lossless
from v2mount.errors import BadRequest
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse, Tensor

__all__ = ["model_metadata", "select_outputs", "shape_matches", "validate_request"]


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    document: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}
    if spec.parameters:
        document["parameters"] = spec.parameters
    return document


def model_metadata(settings: ModelSettings, versions: list[str]) -> dict[str, Any]:
    """The OIP model metadata object (``versions`` omitted when the model has none)."""
    document: dict[str, Any] = {"name": settings.name}
    if versions:
        document["versions"] = versions
    document["platform"] = settings.platform
    document["inputs"] = [_tensor_metadata(spec) for spec in settings.inputs]
    document["outputs"] = [_tensor_metadata(spec) for spec in settings.outputs]
    if settings.parameters.content_type is not None:
        document["parameters"] = {"content_type": settings.parameters.content_type}
    return document


def shape_matches(declared: list[int], actual: tuple[int, ...]) -> bool:
    """Same rank, and every fixed (not ``-1``) declared dimension equal."""
    if len(declared) != len(actual):
        return False
    return all(d == -1 or d == a for d, a in zip(declared, actual, strict=True))


def _convert(tensor: Tensor, spec: TensorSpec) -> None:
    """Bring an input to its declared datatype when no value can be lost, else 400."""
    cast = cast_lossless(tensor.data, spec.datatype)
    if cast is None:
        raise BadRequest(
            f"input {tensor.name!r}: datatype {tensor.datatype} does not match the "
            f"model's {spec.datatype} (only conversions that cannot lose values, such as "
            "FP32 to FP64 or INT32 to INT64, are made)"
        )
    tensor.data, tensor.datatype = cast, spec.datatype


def validate_request(
    settings: ModelSettings, request: InferenceRequest, *, any_input_name: bool = False
) -> None:
    """Check names, datatypes and shapes against the declared inputs and outputs.

    A model that declares no inputs accepts any; likewise for requested outputs. An
    input of another datatype is converted when that loses nothing (``cast_lossless``).
    ``any_input_name`` (MLServer's framework runtimes): a model with one declared input
    takes a single input of any name, renamed to the declared one.
    """
    if settings.inputs:
        declared = {spec.name: spec for spec in settings.inputs}
        if any_input_name and len(declared) == 1 and len(request.inputs) == 1:
            request.inputs[0].name = settings.inputs[0].name
        for tensor in request.inputs:
            spec = declared.get(tensor.name)
            if spec is None:
                raise BadRequest(
                    f"unexpected inference input {tensor.name!r} for model {settings.name!r}; "
                    f"expected {sorted(declared)}"
                )
            if tensor.datatype != spec.datatype:
                _convert(tensor, spec)
            if not shape_matches(spec.shape, tensor.shape):
                raise BadRequest(
                    f"input {tensor.name!r}: shape {list(tensor.shape)} does not match the "
                    f"model's {spec.shape}"
                )
        given = {tensor.name for tensor in request.inputs}
        missing = [s.name for s in settings.inputs if not s.optional and s.name not in given]
        if missing:
            raise BadRequest(f"missing inference input(s) {missing} for model {settings.name!r}")
    if settings.outputs and request.outputs is not None:
        known = {spec.name for spec in settings.outputs}
        for requested in request.outputs:
            if requested.name not in known:
                raise BadRequest(
                    f"unexpected inference output {requested.name!r} for model "
                    f"{settings.name!r}; expected one of {sorted(known)}"
                )


def select_outputs(response: InferenceResponse, request: InferenceRequest) -> InferenceResponse:
    """Keep exactly the outputs the request named (all of them when it named none)."""
    if request.outputs is None:
        return response
    produced = {tensor.name: tensor for tensor in response.outputs}
    selected = []
    for requested in request.outputs:
        tensor = produced.get(requested.name)
        if tensor is None:
            raise BadRequest(
                f"unexpected inference output {requested.name!r}: the model produced "
                f"{sorted(produced)}"
            )
        selected.append(tensor)
    response.outputs = selected
    return response
