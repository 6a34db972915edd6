"""The tuning request: random data of the declared datatypes and shapes, or a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from v2mount.metadata import validate_request
from v2mount.settings import ModelSettings
from v2mount.tuning import TuneError, synthetic_request
from v2mount.tuning._inputs import load_request, request_body


def settings(*inputs: dict[str, object]) -> ModelSettings:
    return ModelSettings.model_validate({"name": "m", "inputs": list(inputs)})


def test_every_declared_datatype_decodes_and_passes_validation() -> None:
    declared = settings(
        {"name": "f", "datatype": "FP64", "shape": [-1, 4]},
        {"name": "h", "datatype": "FP16", "shape": [-1, -1, 2]},
        {"name": "b", "datatype": "BOOL", "shape": [-1]},
        {"name": "i", "datatype": "INT8", "shape": [-1, 3]},
        {"name": "u", "datatype": "UINT64", "shape": [2]},
        {"name": "s", "datatype": "BYTES", "shape": [-1]},
    )
    document = synthetic_request(declared, rows=3)
    body, request = request_body(document)
    validate_request(declared, request)
    shapes = {tensor.name: tensor.shape for tensor in request.inputs}
    assert shapes == {"f": (3, 4), "h": (3, 1, 2), "b": (3,), "i": (3, 3), "u": (2,), "s": (3,)}
    assert request["f"].dtype == np.float64 and request["b"].dtype == np.bool_
    assert request["s"].dtype == object and all(isinstance(v, bytes) for v in request["s"])
    assert body.startswith(b'{"inputs":')


def test_optional_inputs_are_left_out() -> None:
    declared = settings(
        {"name": "x", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1], "optional": True},
    )
    assert [i["name"] for i in synthetic_request(declared)["inputs"]] == ["x"]


def test_a_model_without_declared_inputs_needs_a_request_file() -> None:
    with pytest.raises(TuneError, match=r"declares no inputs.*--request FILE"):
        synthetic_request(settings())
    with pytest.raises(TuneError, match="--rows must be at least 1"):
        synthetic_request(settings({"name": "x", "datatype": "FP32", "shape": [-1]}), rows=0)


def test_a_request_file_is_checked_by_the_real_decoder(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(
        '{"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}'
    )
    assert load_request(good)["inputs"][0]["data"] == [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"inputs": []}')
    with pytest.raises(TuneError, match="not a valid V2 request: 'inputs' must be a non-empty"):
        load_request(bad)
    with pytest.raises(TuneError, match="cannot read --request"):
        load_request(tmp_path / "missing.json")
