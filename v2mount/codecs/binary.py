"""Triton's binary tensor data extension: raw little-endian tensor bytes.

Fixed-size datatypes are row-major and unpadded, BOOL one byte per element; BYTES
elements are each a 4-byte little-endian length followed by that many raw bytes.
Decoded arrays are read-only views of the request body when the chunk is aligned for
its dtype (no copy), and copies otherwise.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from v2mount.codecs.tensor import datatype_to_dtype
from v2mount.errors import BadRequest

__all__ = ["decode_binary_tensor", "encode_binary_tensor"]

_LENGTH = struct.Struct("<I")


def _decode_bytes_elements(
    chunk: bytes | memoryview, count: int, where: str
) -> np.ndarray[Any, Any]:
    items: list[bytes] = []
    offset, end = 0, len(chunk)
    while offset < end:
        if offset + 4 > end:
            raise BadRequest(f"{where}: truncated BYTES element length in binary data")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(f"{where}: BYTES element of {length} bytes runs past its chunk")
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        raise BadRequest(
            f"{where}: binary BYTES data holds {len(items)} elements, shape needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def decode_binary_tensor(
    chunk: bytes | memoryview, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray[Any, Any]:
    """Decode one tensor's binary chunk into an array of ``shape``."""
    dtype = datatype_to_dtype(datatype)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes_elements(chunk, count, where).reshape(shape)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise BadRequest(
            f"{where}: binary_data_size is {len(chunk)} bytes, shape {list(shape)} of "
            f"{datatype} needs {expected}"
        )
    array = np.frombuffer(chunk, dtype=dtype)
    if not array.flags.aligned:
        array = array.copy()
    if datatype == "BOOL" and count and int(np.frombuffer(chunk, dtype=np.uint8).max()) > 1:
        raise BadRequest(f"{where}: BOOL binary data must be 0x00 or 0x01 bytes")
    return array.reshape(shape)


def encode_binary_tensor(array: np.ndarray[Any, Any]) -> bytes | memoryview:
    """The raw bytes of an output array (object arrays are BYTES, length-prefixed)."""
    if array.dtype.kind == "O":
        parts: list[bytes] = []
        for item in array.reshape(-1).tolist():
            parts.append(_LENGTH.pack(len(item)))
            parts.append(item)
        return b"".join(parts)
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.byteorder == ">":
        contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
    return contiguous.reshape(-1).view(np.uint8).data
