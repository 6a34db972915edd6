"""``decode_request``: a bad tensor name is a 400 naming the tensor's position."""

from __future__ import annotations

import orjson
import pytest

from v2mount.codecs.request import decode_request
from v2mount.errors import BadRequest

GOOD = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"inputs": [GOOD, {**GOOD, "name": ""}]}, "inputs[1]: 'name' must be a non-empty string"),
        ({"inputs": [{**GOOD, "name": 3}]}, "inputs[0]: 'name' must be a non-empty string"),
        ({"inputs": [GOOD], "outputs": [{"name": None}]}, "outputs[0]: 'name' must be a"),
    ],
)
def test_a_bad_name_is_a_bad_request_at_its_position(
    document: dict[str, object], message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_request(orjson.dumps(document))
    assert caught.value.message.startswith(message)


def test_good_names_decode() -> None:
    request = decode_request(orjson.dumps({"inputs": [GOOD], "outputs": [{"name": "y"}]}))
    assert [t.name for t in request.inputs] == ["x"]
    assert request.requested_output_names == ["y"]
