"""Content types (np, str, base64, datetime, pd): checks, decoding and encoding."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import numpy as np
import pandas as pd
import pytest

from v2mount.codecs.content import (
    CONTENT_TYPES,
    check_content_types,
    check_declared_content_types,
    decode_input,
    decode_request,
    encode_dataframe,
    encode_output,
    encode_outputs,
)
from v2mount.errors import BadRequest, ModelError, SettingsError
from v2mount.settings import ModelSettings
from v2mount.types import InferenceRequest, RequestedOutput, Tensor


def text(name: str, items: list[bytes], content_type: str | None = None) -> Tensor:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    parameters = {} if content_type is None else {"content_type": content_type}
    return Tensor(name, "BYTES", (len(items),), array, parameters)


def numbers(name: str, data: Any, content_type: str | None = None) -> Tensor:
    array = np.asarray(data, dtype=np.float64)
    parameters = {} if content_type is None else {"content_type": content_type}
    return Tensor(name, "FP64", array.shape, array, parameters)


def settings(**fields: Any) -> ModelSettings:
    return ModelSettings.model_validate({"name": "m", **fields})


def test_names_match_mlserver() -> None:
    assert CONTENT_TYPES == ("np", "str", "base64", "datetime", "pd")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            InferenceRequest([numbers("x", [1])], parameters={"content_type": "parquet"}),
            "request: unknown content type 'parquet'; expected one of np, str, base64",
        ),
        (
            InferenceRequest([numbers("x", [1])], parameters={"content_type": "base64"}),
            "request: content type 'base64' applies to tensors, not whole requests",
        ),
        (
            InferenceRequest([numbers("x", [1], "pd")]),
            "input 'x': content type 'pd' applies to whole requests, not tensors",
        ),
        (
            InferenceRequest([numbers("x", [1], "str")]),
            "input 'x': content type 'str' needs datatype BYTES, got FP64",
        ),
        (
            InferenceRequest([numbers("x", [1], "image")]),
            "input 'x': unknown content type 'image'",
        ),
        (
            InferenceRequest([numbers("x", [1])], parameters={"content_type": 3}),
            "request: 'content_type' must be a string, got 3",
        ),
        (
            InferenceRequest(
                [numbers("x", [1])], outputs=[RequestedOutput("y", {"content_type": "jpeg"})]
            ),
            "output 'y': unknown content type 'jpeg'",
        ),
    ],
)
def test_check_rejects_unknown_and_misplaced_types(
    request_: InferenceRequest, message: str
) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")) as caught:
        check_content_types(request_)
    assert caught.value.status_code == 400


def test_check_accepts_known_types_and_reads_declared_ones() -> None:
    ok = InferenceRequest(
        [text("when", [b"2024-01-01"], "datetime"), numbers("x", [1], "np")],
        parameters={"content_type": "pd"},
        outputs=[RequestedOutput("y", {"content_type": "str"})],
    )
    check_content_types(ok)
    declared = settings(
        inputs=[
            {"name": "x", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "str"}}
        ]
    )
    with pytest.raises(BadRequest, match="'str' needs datatype BYTES, got FP64"):
        check_content_types(InferenceRequest([numbers("x", [1])]), declared)


def test_declared_content_types_are_checked_at_start() -> None:
    check_declared_content_types(settings(parameters={"content_type": "pd"}))
    with pytest.raises(SettingsError, match="model 'm' parameters: content type 'datetime'"):
        check_declared_content_types(settings(parameters={"content_type": "datetime"}))
    wrong = settings(
        outputs=[
            {
                "name": "y",
                "datatype": "FP32",
                "shape": [-1],
                "parameters": {"content_type": "base64"},
            }
        ]
    )
    with pytest.raises(SettingsError, match="model 'm' output 'y': content type 'base64' needs"):
        check_declared_content_types(wrong)


def test_decode_input_by_each_type() -> None:
    array = numbers("x", [[1, 2]])
    assert decode_input(array) is array.data
    assert decode_input(text("t", [b"h\xc3\xa9", b""], "str")) == ["hé", ""]
    assert decode_input(text("b", [base64.b64encode(b"\x00\xff")], "base64")) == [b"\x00\xff"]
    when = decode_input(
        text(
            "d", [b"2024-02-29T12:30:00Z", b"2024-03-01T08:00:00+02:00", b"2024-03-02"], "datetime"
        )
    )
    assert when == [
        dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 3, 1, 8, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        dt.datetime(2024, 3, 2),
    ]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (text("t", [b"\xff"], "str"), "input 't': content type 'str' needs UTF-8 text"),
        (text("b", [b"not base64!"], "base64"), "input 'b': content type 'base64' needs base64"),
        (text("d", [b"yesterday"], "datetime"), "input 'd': content type 'datetime': Invalid"),
    ],
)
def test_decode_input_rejects_bad_payloads(tensor: Tensor, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_input(tensor)


def test_decode_input_precedence() -> None:
    declared = settings(
        inputs=[
            {"name": "t", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "str"}}
        ]
    )
    assert decode_input(text("t", [b"a"]), declared) == ["a"]  # declared
    assert decode_input(text("t", [b"YQ=="], "base64"), declared) == [b"a"]  # own wins
    assert decode_input(text("u", [b"a"]), declared, default="str") == ["a"]  # default
    assert decode_input(text("u", [b"a"]), declared).tolist() == [b"a"]  # none: the array


def test_decode_request_single_input_types() -> None:
    x = numbers("x", [[1.0, 2.0]])
    assert decode_request(InferenceRequest([x]), default="np") is x.data
    assert decode_request(InferenceRequest([text("t", [b"a", b"b"])]), default="str") == ["a", "b"]
    assert decode_request(
        InferenceRequest([text("t", [b"a"])]), settings(parameters={"content_type": "str"})
    ) == ["a"]
    with pytest.raises(BadRequest, match="'np' decodes a request with exactly one input"):
        decode_request(InferenceRequest([x, numbers("y", [1])]), default="np")
    plain = decode_request(InferenceRequest([x, text("t", [b"a"], "str")]))
    assert plain == {"x": x.data, "t": ["a"]}


def test_decode_request_pd() -> None:
    request = InferenceRequest(
        [
            numbers("a", [1.0, 2.0]),
            numbers("b", [[3.0], [4.0]]),
            text("c", [b"x", b"y"]),
            text("raw", [b"\xff", b"\x00"]),
            text("d", [b"2024-01-01", b"2024-01-02"], "datetime"),
            numbers("pairs", [[1, 2], [3, 4]]),
        ],
        parameters={"content_type": "pd"},
    )
    frame = decode_request(request)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["a", "b", "c", "raw", "d", "pairs"]
    assert frame["b"].tolist() == [3.0, 4.0]  # [N, 1] is a plain column
    assert frame["c"].tolist() == ["x", "y"]  # UTF-8 BYTES become str
    assert frame["raw"].tolist() == [b"\xff", b"\x00"]  # other bytes stay bytes
    assert frame["d"].tolist() == [pd.Timestamp("2024-01-01"), pd.Timestamp("2024-01-02")]
    assert [row.tolist() for row in frame["pairs"]] == [[1, 2], [3, 4]]
    uneven = InferenceRequest(
        [numbers("a", [1.0, 2.0]), numbers("b", [1.0])], parameters={"content_type": "pd"}
    )
    with pytest.raises(BadRequest, match="input 'b' has 1 rows, the others 2"):
        decode_request(uneven)


def test_encode_output_infers_and_follows_mlserver_shapes() -> None:
    words = encode_output("w", ["hé", "b"])
    assert (words.datatype, words.shape, words.parameters) == (
        "BYTES",
        (2, 1),
        {"content_type": "str"},
    )
    assert words.data.ravel().tolist() == ["hé".encode(), b"b"]
    blobs = encode_output("b", [b"\x00\xff"])
    assert blobs.parameters == {"content_type": "base64"}
    assert blobs.data.ravel().tolist() == [base64.b64encode(b"\x00\xff")]
    when = encode_output("d", [dt.datetime(2024, 1, 2, 3, 4, 5), dt.date(2024, 1, 2)])
    assert when.data.ravel().tolist() == [b"2024-01-02T03:04:05", b"2024-01-02"]
    plain = encode_output("n", np.arange(6, dtype=np.int32).reshape(2, 3))
    assert (plain.datatype, plain.shape, plain.parameters) == ("INT32", (2, 3), {})
    forced = encode_output("s", np.array(["a", "b"]), content_type="str")
    assert forced.data.ravel().tolist() == [b"a", b"b"]
    single = encode_output("one", "text", content_type="str")
    assert single.shape == (1, 1)
    series = encode_output("col", pd.Series([1.5, 2.5]))
    assert (series.datatype, series.data.tolist()) == ("FP64", [1.5, 2.5])


def test_encode_output_declared_datatypes_and_errors() -> None:
    cast = encode_output("y", np.array([1, 2], dtype=np.int64), datatype="FP32")
    assert (cast.datatype, cast.data.dtype) == ("FP32", np.dtype(np.float32))
    with pytest.raises(ModelError, match="output 'y' is FP64, which does not convert to the"):
        encode_output("y", np.array([1.5]), datatype="INT64")
    # One rule with the Model path: values that survive are cast, others refused.
    small = encode_output("y", np.array([0, 1, 2], dtype=np.int64), datatype="UINT8")
    assert (small.datatype, small.data.tolist()) == ("UINT8", [0, 1, 2])
    with pytest.raises(ModelError, match="INT64, which does not convert to the declared UINT8"):
        encode_output("y", np.array([0, 300], dtype=np.int64), datatype="UINT8")
    with pytest.raises(ModelError, match="declared BYTES but the model returned numbers"):
        encode_output("y", np.array([1.5]), datatype="BYTES")
    with pytest.raises(ModelError, match="'str' needs str or bytes, got int"):
        encode_output("y", [1, 2], content_type="str")
    with pytest.raises(ModelError, match="'datetime' needs datetimes"):
        encode_output("y", [1], content_type="datetime")
    with pytest.raises(BadRequest, match="'pd' applies to whole requests"):
        encode_output("y", [1], content_type="pd")


def test_encode_outputs_and_dataframes() -> None:
    declared = settings(
        outputs=[
            {
                "name": "a",
                "datatype": "BYTES",
                "shape": [-1, 1],
                "parameters": {"content_type": "str"},
            },
            {"name": "b", "datatype": "FP32", "shape": [-1]},
        ]
    )
    request = InferenceRequest(
        [numbers("x", [1])], outputs=[RequestedOutput("c", {"content_type": "base64"})]
    )
    tensors = encode_outputs(
        {"a": np.array(["x"]), "b": np.array([1.0]), "c": [b"z"]}, request, declared
    )
    assert [(t.name, t.datatype, t.parameters) for t in tensors] == [
        ("a", "BYTES", {"content_type": "str"}),
        ("b", "FP32", {}),
        ("c", "BYTES", {"content_type": "base64"}),
    ]
    frame = pd.DataFrame({"n": [1, 2], "s": ["p", "q"]})
    columns = encode_dataframe(frame)
    assert [(t.name, t.datatype, t.shape) for t in columns] == [
        ("n", "INT64", (2,)),
        ("s", "BYTES", (2,)),
    ]
    assert columns[1].data.tolist() == [b"p", b"q"]
    assert [t.name for t in encode_outputs(frame, request)] == ["n", "s"]
    with pytest.raises(ModelError, match="got int"):
        encode_outputs(3, request)
