"""The benchmark models as ``mlserver.MLModel`` subclasses (logic in ``bench_core``).

Leaner than MLServer's own sklearn runtime (no content-type negotiation), so the
comparison does not charge MLServer for code a hand-written model would skip.
"""

from __future__ import annotations

from typing import Any

import bench_core
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

__all__ = ["EchoModel", "HeavyModel", "TinyModel", "VectorModel"]


class _CoreModel(MLModel):  # type: ignore[misc]
    core_class: Any = None
    output_name = "y"

    async def load(self) -> bool:
        self.core = self.core_class(await get_model_uri(self.settings))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self.output_name, self.core.predict(x))],
        )


class TinyModel(_CoreModel):
    core_class = bench_core.Tiny
    output_name = "predict"


class HeavyModel(_CoreModel):
    core_class = bench_core.Heavy


class VectorModel(_CoreModel):
    core_class = bench_core.Vector


class EchoModel(MLModel):  # type: ignore[misc]
    """Returns its input ``x`` as ``y`` (for the payload-size scenario)."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("y", x)],
        )
