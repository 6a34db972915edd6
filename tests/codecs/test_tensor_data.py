"""``decode_json_data``: numbers out of a datatype's range are refused, however sent.

Short flat lists of numbers in range skip ``np.errstate``; everything else converts
under it. Both ways must answer alike.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from v2mount.codecs.tensor import decode_json_data
from v2mount.errors import BadRequest


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "expected"),
    [
        ([5.9, 3.0, 5.1, 1.8], "FP32", (1, 4), np.array([[5.9, 3.0, 5.1, 1.8]], np.float32)),
        ([[1.0, 2.0]], "FP32", (1, 2), np.array([[1.0, 2.0]], np.float32)),
        ([1.5, 2], "INT32", (2,), np.array([1, 2], np.int32)),
        ([True, 0.5], "FP16", (2,), np.array([1.0, 0.5], np.float16)),
        ([65504.0], "FP16", (1,), np.array([65504.0], np.float16)),
        ([255, 0], "UINT8", (2,), np.array([255, 0], np.uint8)),
        (list(range(100)), "INT8", (100,), np.arange(100, dtype=np.int8)),
    ],
)
def test_numbers_in_range_convert(
    data: list[object], datatype: str, shape: tuple[int, ...], expected: np.ndarray
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array = decode_json_data(data, datatype, shape, "input 'x'")
    assert array.dtype == expected.dtype and array.shape == expected.shape
    assert np.array_equal(array, expected)


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        ([1e39], "FP32", (1,), "overflow"),
        ([[1e39]], "FP32", (1, 1), "overflow"),  # nested: the trapping path
        ([1.0] * 99 + [1e39], "FP32", (100,), "overflow"),  # long: the trapping path
        ([70000.0], "FP16", (1,), "overflow"),
        ([3e9], "INT32", (1,), "not valid INT32"),
        ([1e300], "INT64", (1,), "not valid INT64"),
        ([-1], "UINT8", (1,), "out of bounds"),
        ([1.8446744073709552e19], "UINT64", (1,), "not valid UINT64"),  # 2**64 as a float
        (["x"], "FP32", (1,), "could not convert"),
    ],
)
def test_numbers_out_of_range_are_a_bad_request(
    data: list[object], datatype: str, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        decode_json_data(data, datatype, shape, "input 'x'")
    assert caught.value.message.startswith(f"input 'x': data is not valid {datatype}")
