"""Content types: what Python object a tensor (or a whole request) stands for.

MLServer's ``content_type`` parameter, with the same names and meanings:

| content type | where | decoded to | encoded from |
| --- | --- | --- | --- |
| ``np`` | input, output, request | ``numpy.ndarray`` (the tensor as is) | array-like |
| ``str`` | input, output, request | ``list[str]`` (UTF-8, flattened) | list of ``str`` |
| ``base64`` | input, output | ``list[bytes]`` (each element base64-decoded) | list of ``bytes`` |
| ``datetime`` | input, output | ``list[datetime]`` (ISO 8601) | list of ``datetime`` |
| ``pd`` | request | ``pandas.DataFrame``, one column per input | ``DataFrame`` |

A tensor's content type is its own ``parameters.content_type``, else the one its
declared ``TensorSpec`` carries in the model settings; a request's is its own, else
``ModelSettings.parameters.content_type``, else the default the caller passes. ``str``,
``base64`` and ``datetime`` apply to ``BYTES`` tensors only. An unknown content type, or
one used where it does not apply, is a ``BadRequest`` (400); a declared one that is
wrong is a ``SettingsError`` (``check_declared_content_types``).

pandas is imported only when a ``pd`` request is decoded. Every function here is pure
and thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from v2mount.codecs.tensor import array_to_datatype, cast_lossless, to_output_array
from v2mount.errors import BadRequest, ModelError, SettingsError
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import InferenceRequest, Parameters, Tensor

__all__ = [
    "CONTENT_TYPES",
    "check_content_types",
    "check_declared_content_types",
    "decode_input",
    "decode_request",
    "encode_dataframe",
    "encode_output",
    "encode_outputs",
]

#: Every content type v2mount knows, in MLServer's spelling.
CONTENT_TYPES: tuple[str, ...] = ("np", "str", "base64", "datetime", "pd")
_TENSOR_TYPES = frozenset({"np", "str", "base64", "datetime"})
_REQUEST_TYPES = frozenset({"np", "str", "pd"})
_BYTES_TYPES = frozenset({"str", "base64", "datetime"})


def _content_type(parameters: Parameters | None, where: str) -> str | None:
    value = (parameters or {}).get("content_type")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{where}: 'content_type' must be a string, got {value!r}")
    return value


def _spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec | None:
    for spec in specs:
        if spec.name == name:
            return spec
    return None


def _declared(settings: ModelSettings | None, name: str, *, output: bool) -> str | None:
    if settings is None:
        return None
    spec = _spec(settings.outputs if output else settings.inputs, name)
    if spec is None:
        return None
    value = spec.parameters.get("content_type")
    return value if isinstance(value, str) else None


def _check_tensor_type(content_type: str, datatype: str | None, where: str) -> None:
    if content_type not in _TENSOR_TYPES:
        if content_type in CONTENT_TYPES:
            raise BadRequest(
                f"{where}: content type {content_type!r} applies to whole requests, not tensors"
            )
        raise BadRequest(
            f"{where}: unknown content type {content_type!r}; expected one of "
            f"{', '.join(CONTENT_TYPES)}"
        )
    if datatype is not None and content_type in _BYTES_TYPES and datatype != "BYTES":
        raise BadRequest(
            f"{where}: content type {content_type!r} needs datatype BYTES, got {datatype}"
        )


def _check_request_type(content_type: str, where: str) -> None:
    if content_type not in _REQUEST_TYPES:
        if content_type in CONTENT_TYPES:
            raise BadRequest(
                f"{where}: content type {content_type!r} applies to tensors, not whole requests"
            )
        raise BadRequest(
            f"{where}: unknown content type {content_type!r}; expected one of "
            f"{', '.join(CONTENT_TYPES)}"
        )


def check_content_types(request: InferenceRequest, settings: ModelSettings | None = None) -> None:
    """Reject (``BadRequest``) unknown or misplaced content types before inference.

    Checks the request's own content type, each input's (its own or the declared one,
    against its datatype) and each requested output's. Cheap: it reads parameters only.
    """
    own = _content_type(request.parameters, "request")
    if own is not None:
        _check_request_type(own, "request")
    declared = settings is not None and bool(settings.inputs)
    for tensor in request.inputs:
        if not tensor.parameters and not declared:
            continue  # no content type to check
        where = f"input {tensor.name!r}"
        content_type = _content_type(tensor.parameters, where) or _declared(
            settings, tensor.name, output=False
        )
        if content_type is not None:
            _check_tensor_type(content_type, tensor.datatype, where)
    for requested in request.outputs or ():
        where = f"output {requested.name!r}"
        content_type = _content_type(requested.parameters, where)
        if content_type is not None:
            _check_tensor_type(content_type, None, where)


def check_declared_content_types(settings: ModelSettings) -> None:
    """Reject (``SettingsError``) content types in model settings that cannot work."""
    where = f"model {settings.name!r}"
    try:
        if settings.parameters.content_type is not None:
            _check_request_type(settings.parameters.content_type, f"{where} parameters")
        for kind, specs in (("input", settings.inputs), ("output", settings.outputs)):
            for spec in specs:
                content_type = _content_type(spec.parameters, f"{where} {kind} {spec.name!r}")
                if content_type is not None:
                    _check_tensor_type(content_type, spec.datatype, f"{where} {kind} {spec.name!r}")
    except BadRequest as exc:
        raise SettingsError(exc.message) from None


def _strings(tensor: Tensor) -> list[str]:
    try:
        return [item.decode("utf-8") for item in tensor.data.reshape(-1).tolist()]
    except UnicodeDecodeError:
        raise BadRequest(f"input {tensor.name!r}: content type 'str' needs UTF-8 text") from None


def _base64(tensor: Tensor) -> list[bytes]:
    items = tensor.data.reshape(-1).tolist()
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"input {tensor.name!r}: content type 'base64' needs base64 text"
        ) from None


def _datetime(text: str) -> dt.datetime:
    # datetime.fromisoformat only learnt the "Z" suffix in Python 3.11.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return dt.datetime.fromisoformat(text)


def _datetimes(tensor: Tensor) -> list[dt.datetime]:
    try:
        return [_datetime(item) for item in _strings(tensor)]
    except ValueError as exc:
        raise BadRequest(f"input {tensor.name!r}: content type 'datetime': {exc}") from None


def decode_input(
    tensor: Tensor, settings: ModelSettings | None = None, default: str | None = None
) -> Any:
    """The Python object one input stands for (see the module table).

    The tensor's own content type wins over the declared one, which wins over
    ``default``; with none of them the numpy array is returned as is.
    """
    where = f"input {tensor.name!r}"
    content_type = (
        _content_type(tensor.parameters, where)
        or _declared(settings, tensor.name, output=False)
        or default
    )
    if content_type is None or content_type == "np":
        return tensor.data
    _check_tensor_type(content_type, tensor.datatype, where)
    if content_type == "str":
        return _strings(tensor)
    if content_type == "base64":
        return _base64(tensor)
    return _datetimes(tensor)


def _single(request: InferenceRequest, content_type: str) -> Tensor:
    if len(request.inputs) != 1:
        raise BadRequest(
            f"content type {content_type!r} decodes a request with exactly one input; "
            f"this one has {len(request.inputs)}"
        )
    return request.inputs[0]


def _column(tensor: Tensor, value: Any) -> Any:
    """One DataFrame column: 1-D values, or one row per element of axis 0."""
    if not isinstance(value, np.ndarray):
        return list(value)
    if value.ndim == 0:
        value = value.reshape(1)
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim > 1:
        return list(value)
    if tensor.datatype == "BYTES":
        items = value.tolist()
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            return items
    return value


def _dataframe(request: InferenceRequest, settings: ModelSettings | None) -> Any:
    try:
        pd = importlib.import_module("pandas")
    except ImportError:
        raise BadRequest(
            "content type 'pd' needs pandas, which is not installed on the server"
        ) from None
    columns: dict[str, Any] = {}
    rows: int | None = None
    for tensor in request.inputs:
        column = _column(tensor, decode_input(tensor, settings))
        if rows is not None and len(column) != rows:
            raise BadRequest(
                f"content type 'pd': input {tensor.name!r} has {len(column)} rows, "
                f"the others {rows}"
            )
        rows = len(column)
        columns[tensor.name] = column
    return pd.DataFrame(columns)


def decode_request(
    payload: InferenceRequest, settings: ModelSettings | None = None, default: str | None = None
) -> Any:
    """The Python object a whole request stands for.

    ``np`` and ``str`` give the decoded single input (``BadRequest`` if there are
    several), ``pd`` a DataFrame with one column per input (each input decoded by its
    own content type first; ``[N, 1]`` inputs become plain columns, BYTES columns
    ``str`` when they are UTF-8). With no content type at all: a ``dict`` of input
    name → decoded input.
    """
    content_type = (
        _content_type(payload.parameters, "request")
        or (settings.parameters.content_type if settings is not None else None)
        or default
    )
    if content_type is None:
        return {tensor.name: decode_input(tensor, settings) for tensor in payload.inputs}
    _check_request_type(content_type, "request")
    if content_type == "pd":
        return _dataframe(payload, settings)
    return decode_input(_single(payload, content_type), settings, default=content_type)


def _is_dataframe(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def _is_series(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.Series)


def _infer_content_type(value: Any) -> str:
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(item, str) for item in value):
            return "str"
        if all(isinstance(item, bytes) for item in value):
            return "base64"
        if all(isinstance(item, (dt.date, dt.datetime)) for item in value):
            return "datetime"
    return "np"


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, dt.date)):
        return [value]
    if isinstance(value, np.ndarray) or _is_series(value):
        return list(np.asarray(value).reshape(-1).tolist())
    return list(value)


def _bytes_tensor(
    name: str, items: list[bytes], content_type: str, parameters: Parameters
) -> Tensor:
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = items
    return Tensor(name, "BYTES", array.shape, array, {**parameters, "content_type": content_type})


def _iso(item: Any, name: str) -> bytes:
    if isinstance(item, (dt.date, dt.datetime)):
        return item.isoformat().encode("ascii")
    if isinstance(item, str):
        return item.encode("utf-8")
    raise ModelError(f"output {name!r}: content type 'datetime' needs datetimes, got {item!r}")


def _numeric(name: str, value: Any, datatype: str | None) -> Tensor:
    array = to_output_array(value.to_numpy() if _is_series(value) else value, name)
    if datatype is not None:
        if datatype == "BYTES" and array.dtype.kind != "O":
            raise ModelError(f"output {name!r} is declared BYTES but the model returned numbers")
        cast = cast_lossless(array, datatype, output=True)
        if cast is None:
            raise ModelError(
                f"output {name!r} is {array_to_datatype(array)}, which does not convert to "
                f"the declared {datatype} without loss"
            )
        array = cast
    return Tensor(name, array_to_datatype(array), tuple(array.shape), array)


def encode_output(
    name: str, value: Any, content_type: str | None = None, datatype: str | None = None
) -> Tensor:
    """One output tensor from a Python value.

    Without ``content_type`` it is inferred: a list of ``str`` → ``str``, of ``bytes``
    → ``base64``, of datetimes → ``datetime``, anything else → ``np``. ``str``,
    ``base64`` and ``datetime`` outputs are BYTES tensors of shape ``[N, 1]`` (as in
    MLServer) and say their content type in ``parameters``. ``datatype`` (a declared
    one) casts ``np`` outputs by ``cast_lossless`` (the rule for declared outputs);
    ``ModelError`` when that would lose values.
    """
    if content_type is None:
        content_type = _infer_content_type(value)
    _check_tensor_type(content_type, None, f"output {name!r}")
    if content_type == "np":
        return _numeric(name, value, datatype)
    items = _as_list(value)
    if content_type == "datetime":
        return _bytes_tensor(name, [_iso(item, name) for item in items], "datetime", {})
    encoded: list[bytes] = []
    for item in items:
        raw = item.encode("utf-8") if isinstance(item, str) else item
        if not isinstance(raw, bytes):
            raise ModelError(
                f"output {name!r}: content type {content_type!r} needs str or bytes, "
                f"got {type(item).__name__}"
            )
        encoded.append(base64.b64encode(raw) if content_type == "base64" else raw)
    return _bytes_tensor(name, encoded, content_type, {})


def encode_dataframe(frame: Any) -> list[Tensor]:
    """One output per column of a ``pandas.DataFrame`` (shape ``[N]``), as MLServer's ``pd``."""
    return [_numeric(str(column), frame[column], None) for column in frame.columns]


def encode_outputs(
    values: Mapping[str, Any] | Any,
    request: InferenceRequest,
    settings: ModelSettings | None = None,
) -> list[Tensor]:
    """Encode what a model computed, each output by its requested or declared content type.

    ``values`` is a mapping of output name → value, or a DataFrame (its columns). A
    requested output's ``content_type`` wins over the declared one; a declared datatype
    is applied to ``np`` outputs.
    """
    if _is_dataframe(values):
        return encode_dataframe(values)
    if not isinstance(values, Mapping):
        raise ModelError(
            "expected a mapping of output name to value, or a DataFrame; "
            f"got {type(values).__name__}"
        )
    requested = {out.name: out.parameters for out in request.outputs or ()}
    tensors = []
    for name, value in values.items():
        content_type = _content_type(requested.get(name), f"output {name!r}") or _declared(
            settings, name, output=True
        )
        spec = _spec(settings.outputs, name) if settings is not None else None
        datatype = spec.datatype if spec is not None else None
        tensors.append(encode_output(name, value, content_type, datatype))
    return tensors
