"""The request a tuning run sends: built from the model's declared inputs, or from a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from v2mount.codecs.request import decode_request
from v2mount.errors import BadRequest
from v2mount.settings import ModelSettings, TensorSpec
from v2mount.types import InferenceRequest

__all__ = ["TuneError", "load_request", "request_body", "synthetic_request"]


class TuneError(Exception):
    """A tuning run cannot go on; the message says why (shown to the user as is)."""


def _shape(spec: TensorSpec, rows: int) -> list[int]:
    """``-1`` in the first dimension takes ``rows``; any other ``-1`` takes 1."""
    return [
        (rows if index == 0 else 1) if dim == -1 else dim for index, dim in enumerate(spec.shape)
    ]


def _data(datatype: str, size: int, rng: np.random.Generator) -> list[Any]:
    if datatype == "BYTES":
        return ["".join(rng.choice(list("abcdefghij"), 8)) for _ in range(size)]
    if datatype == "BOOL":
        return [bool(value) for value in rng.integers(0, 2, size)]
    if datatype.startswith("FP"):
        return [float(value) for value in rng.standard_normal(size).astype(np.float32)]
    return [int(value) for value in rng.integers(0, 10, size)]


def synthetic_request(settings: ModelSettings, rows: int = 1, seed: int = 0) -> dict[str, Any]:
    """A V2 request document with random data for every declared, non-optional input."""
    if rows < 1:
        raise TuneError(f"--rows must be at least 1, not {rows}")
    specs = [spec for spec in settings.inputs if not spec.optional]
    if not specs:
        raise TuneError(
            f"model {settings.name!r} declares no inputs in its model-settings.json: "
            "give a request with --request FILE"
        )
    rng = np.random.default_rng(seed)
    inputs = []
    for spec in specs:
        shape = _shape(spec, rows)
        size = int(np.prod(shape)) if shape else 1
        inputs.append(
            {
                "name": spec.name,
                "datatype": spec.datatype,
                "shape": shape,
                "data": _data(spec.datatype, size, rng),
            }
        )
    return {"inputs": inputs}


def load_request(path: Path) -> dict[str, Any]:
    """A V2 request document read from a JSON file (checked by the real decoder)."""
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise TuneError(f"cannot read --request {path}: {exc.strerror or exc}") from None
    try:
        decode_request(body)
    except BadRequest as exc:
        raise TuneError(f"--request {path} is not a valid V2 request: {exc.message}") from None
    document: dict[str, Any] = json.loads(body)
    return document


def request_body(document: dict[str, Any]) -> tuple[bytes, InferenceRequest]:
    """The JSON body to send over ASGI, and the decoded request to send to the registry."""
    body = orjson.dumps(document)
    return body, decode_request(body)
