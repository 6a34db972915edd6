"""Open Inference Protocol request and response types, with tensor data held as numpy.

These are plain slotted dataclasses, not pydantic models: the hot path builds them from
already-validated JSON, and they cross into worker processes cheaply (no HTTP headers,
no validators). BYTES tensors are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES",
    "InferenceRequest",
    "InferenceResponse",
    "Parameters",
    "RequestedOutput",
    "Tensor",
]

Parameters = dict[str, Any]

#: The twelve OIP datatypes (BF16 is not representable in numpy without extra packages).
DATATYPES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)


@dataclass(slots=True)
class Tensor:
    """One named input or output tensor; ``data`` already has shape ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest(Mapping[str, "np.ndarray[Any, Any]"]):
    """A decoded inference request.

    It is also a read-only mapping from input name to numpy array, so a model can write
    ``payload["x"]`` and ignore the protocol, or read ``id``, ``parameters``, the typed
    ``inputs`` and the requested ``outputs`` when it needs them.
    """

    inputs: list[Tensor]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor.data
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (tensor.name for tensor in self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def input(self, name: str) -> Tensor:
        """The typed input tensor called ``name`` (``KeyError`` if absent)."""
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    @property
    def requested_output_names(self) -> list[str] | None:
        """Names of the outputs the client asked for, or ``None`` for all of them."""
        return None if self.outputs is None else [out.name for out in self.outputs]


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)

    def output(self, name: str) -> Tensor:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)
