"""numpy ⇄ OIP tensor data (the JSON ``data`` field), datatype by datatype.

Numeric data goes from the parsed JSON list to a numpy array in one C-level call and
back through orjson's native numpy serialisation: no per-element Python work except for
BYTES, whose elements are strings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from v2mount.codecs.fastjson import SimdArray, array_from_simd
from v2mount.errors import BadRequest, ModelError

__all__ = [
    "array_to_datatype",
    "cast_lossless",
    "check_shape",
    "datatype_to_dtype",
    "decode_json_data",
    "encode_json_data",
    "to_output_array",
]

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_KIND_TO_DATATYPE = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}


def datatype_to_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype; ``BadRequest`` for an unknown one."""
    try:
        return _DTYPES[datatype]
    except (KeyError, TypeError):
        raise BadRequest(
            f"unknown datatype {datatype!r}; expected one of {', '.join(_DTYPES)}"
        ) from None


def array_to_datatype(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype for a numpy array; str/bytes/object arrays are BYTES."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    try:
        return _KIND_TO_DATATYPE[(kind, array.dtype.itemsize)]
    except KeyError:
        raise ModelError(
            f"the model returned an array of unsupported dtype {array.dtype}"
        ) from None


#: Bits of integer a float holds exactly (its significand).
_EXACT_INT_BITS = {2: 11, 4: 24, 8: 53}


def _lossless_dtype(source: np.dtype[Any], target: np.dtype[Any]) -> bool:
    """Every value of ``source`` has an exact image in ``target``."""
    if not np.can_cast(source, target, "safe"):
        return False
    if source.kind in "iu" and target.kind == "f":
        bits = source.itemsize * 8 - (source.kind == "i")
        return bits <= _EXACT_INT_BITS[target.itemsize]
    return True


def cast_lossless(
    array: np.ndarray[Any, Any], datatype: str, *, output: bool = False
) -> np.ndarray[Any, Any] | None:
    """``array`` as ``datatype`` when the cast loses nothing, else ``None``.

    The one casting rule for declared datatypes. A cast between types where every value
    of the source has an exact image (FP32 → FP64, INT32 → INT64, INT16 → FP32, BOOL →
    INT8) is always made; between BYTES and numbers, never. For a declared *output*, the
    model author's own data, a cast is also made when no value of *this* array changes
    (INT64 ``[0, 1, 2]`` → UINT8), and a float may be rounded to a narrower declared
    float (declaring FP32 asks for that), unless a finite value overflows. A client's
    input is held to the type rule alone, so whether a request is accepted never
    depends on its values.
    """
    target = datatype_to_dtype(datatype)
    source = array.dtype
    if source == target:
        return array
    if (source.kind == "O") != (target.kind == "O"):
        return None
    if _lossless_dtype(source, target):
        return array.astype(target)
    if not output:
        return None
    with np.errstate(all="ignore"):
        cast = array.astype(target)
        if source.kind == "f" and target.kind == "f":
            kept = np.array_equal(np.isfinite(cast), np.isfinite(array))
        else:
            kept = np.array_equal(cast.astype(source), array, equal_nan=source.kind == "f")
    return cast if kept else None


#: numpy holds at most 64 dimensions; no model needs more than this.
MAX_RANK = 32
#: Beyond this, numpy cannot describe the array even when it is empty (a 0 dimension).
_MAX_EXTENT = 2**53


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A request shape: a list of non-negative integers (no -1 outside metadata)."""
    if not isinstance(shape, list):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise BadRequest(f"{where}: 'shape' has {len(shape)} dimensions, at most {MAX_RANK}")
    extent = 1  # of the non-zero dimensions: one pass, no generator (the hot path)
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise BadRequest(
                f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}"
            )
        if dim:
            extent *= dim
    if extent > _MAX_EXTENT:
        raise BadRequest(f"{where}: 'shape' {shape} is too large")
    return tuple(shape)


def _flatten_strings(data: Any, out: list[bytes], where: str) -> None:
    for item in data:
        if isinstance(item, str):
            out.append(item.encode("utf-8"))
        elif isinstance(item, list):
            _flatten_strings(item, out, where)
        else:
            raise BadRequest(f"{where}: BYTES data must be strings, got {type(item).__name__}")


#: Each numeric dtype's finite range: numbers inside it convert with no overflow or
#: invalid cast to trap.
_RANGES: dict[np.dtype[Any], tuple[float, float]] = {
    dtype: (float(info.min), float(info.max)) if dtype.kind == "f" else (info.min, info.max)
    for dtype in _DTYPES.values()
    if dtype.kind in "uif"
    for info in [np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)]
}


def _within(data: list[Any], dtype: np.dtype[Any]) -> bool:
    """Whether ``data`` is a short flat list of numbers in ``dtype``'s range, which needs
    no ``np.errstate`` (entering one costs four times the conversion of a few numbers).
    Nested lists, strings and the like compare with a TypeError: the trapping path."""
    bounds = _RANGES.get(dtype)
    if bounds is None or len(data) > 64:
        return False
    try:
        return bool(bounds[0] <= min(data) and max(data) <= bounds[1])
    except (TypeError, ValueError):
        return False


def decode_json_data(
    data: Any, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray[Any, Any]:
    """Turn a parsed JSON ``data`` value (flat or nested) into an array of ``shape``."""
    dtype = datatype_to_dtype(datatype)
    expected = math.prod(shape)
    if isinstance(data, SimdArray):
        array = array_from_simd(data, dtype)
        if array is not None:
            if array.size != expected:
                raise BadRequest(
                    f"{where}: shape {list(shape)} needs {expected} elements, data has {array.size}"
                )
            return array.reshape(shape)
        data = data.as_list()
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        items: list[bytes] = []
        _flatten_strings(data, items, where)
        if len(items) != expected:
            raise BadRequest(
                f"{where}: shape {list(shape)} needs {expected} elements, data has {len(items)}"
            )
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    try:
        if _within(data, dtype):
            array = np.array(data, dtype=dtype)
        else:
            with np.errstate(over="raise", invalid="raise"):
                array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise BadRequest(f"{where}: data is not valid {datatype}: {exc}") from None
    if array.size != expected:
        raise BadRequest(
            f"{where}: shape {list(shape)} needs {expected} elements, data has {array.size}"
        )
    return array.reshape(shape)


def to_output_array(value: Any, name: str) -> np.ndarray[Any, Any]:
    """Coerce what a model returned for output ``name`` to an array OIP can carry."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    kind = array.dtype.kind
    if kind == "U":
        encoded = np.empty(array.shape, dtype=object)
        encoded.reshape(-1)[:] = [s.encode("utf-8") for s in array.reshape(-1).tolist()]
        return encoded
    if kind == "S":
        return array.astype(object)
    if kind == "O":
        flat = array.reshape(-1)
        for item in flat:
            if not isinstance(item, bytes):
                if isinstance(item, str):
                    return to_output_array(array.astype(str), name)
                raise ModelError(
                    f"output {name!r}: object arrays must hold str or bytes, "
                    f"found {type(item).__name__}"
                )
        return array
    array_to_datatype(array)
    return array


def encode_json_data(tensor_data: np.ndarray[Any, Any], name: str) -> Sequence[Any] | Any:
    """The JSON-ready ``data`` for an output array: a flat array or list of strings."""
    flat = tensor_data.reshape(-1)
    if tensor_data.dtype.kind == "O":
        try:
            return [item.decode("utf-8") for item in flat.tolist()]
        except UnicodeDecodeError:
            raise BadRequest(
                f"output {name!r} holds bytes that are not UTF-8, which JSON cannot carry; "
                "request it as binary data (parameters.binary_data: true)"
            ) from None
    return np.ascontiguousarray(flat)
