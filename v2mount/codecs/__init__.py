"""Tensor codecs: numpy ⇄ OIP JSON tensor data, and Triton's binary tensor extension."""

from __future__ import annotations

from v2mount.codecs.tensor import (
    array_to_datatype,
    datatype_to_dtype,
    decode_json_data,
    encode_json_data,
    to_output_array,
)

__all__ = [
    "array_to_datatype",
    "datatype_to_dtype",
    "decode_json_data",
    "encode_json_data",
    "to_output_array",
]
