"""``OnnxModel``: an ONNX file run by ONNX Runtime.

The inputs and outputs, with their names, datatypes and shapes, come from the file:
``load`` fills ``settings.inputs`` and ``settings.outputs`` when ``model-settings.json``
does not declare them, so the served metadata and the request checks match the model.
Non-tensor outputs (such as the ``ZipMap`` dictionaries skl2onnx adds to classifiers;
convert with ``zipmap=False``) are left out.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from v2mount.codecs.content import decode_input
from v2mount.errors import BadRequest, SettingsError
from v2mount.runtimes._base import FrameworkModel, import_extra
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["OnnxModel"]

_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(node: Any) -> TensorSpec | None:
    datatype = _DATATYPES.get(node.type)
    if datatype is None:
        return None
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape]
    return TensorSpec(name=node.name, datatype=datatype, shape=shape)


def _specs(nodes: list[Any], kind: str) -> list[TensorSpec]:
    specs = []
    for node in nodes:
        spec = _spec(node)
        if spec is not None:
            specs.append(spec)
        elif kind == "input":
            raise TypeError(
                f"ONNX input {node.name!r} has type {node.type}, which v2mount cannot feed"
            )
    return specs


class OnnxModel(FrameworkModel):
    """Serves an ONNX model with ONNX Runtime (extra ``v2mount[onnx]``).

    ``load`` opens ``parameters.uri`` (``model.onnx`` in a folder) with
    ``intra_op_num_threads = threads_per_worker`` and one inter-op thread, so N workers
    use N * threads cores, not N * all of them. ``parameters.providers`` (a list) picks
    execution providers; the default is ``["CPUExecutionProvider"]``. A session is
    thread-safe, so concurrent ``predict`` calls are fine.
    """

    platform = "onnxruntime_onnx"
    well_known_files = ("model.onnx",)
    preload: ClassVar[tuple[str, ...]] = ("onnxruntime",)

    def load(self) -> None:
        ort = import_extra("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        extra = self.settings.parameters.model_extra or {}
        providers = extra.get("providers") or ["CPUExecutionProvider"]
        self._session: Any = ort.InferenceSession(
            str(self.model_path()), sess_options=options, providers=list(providers)
        )
        inputs = _specs(self._session.get_inputs(), "input")
        outputs = _specs(self._session.get_outputs(), "output")
        if not outputs:
            raise TypeError("the ONNX model has no tensor outputs")
        self._inputs = {spec.name: spec for spec in inputs}
        self._outputs = [spec.name for spec in outputs]
        for kind, declared, known in (
            ("inputs", self.settings.inputs, list(self._inputs)),
            ("outputs", self.settings.outputs, self._outputs),
        ):
            unknown = [spec.name for spec in declared if spec.name not in known]
            if unknown:
                raise SettingsError(
                    f"model {self.settings.name!r} declares {kind} {unknown} that the ONNX "
                    f"file does not have; it has {known}"
                )
        if not self.settings.inputs:
            self.settings.inputs = inputs
        if not self.settings.outputs:
            self.settings.outputs = outputs

    def _feed(self, payload: InferenceRequest) -> dict[str, Any]:
        given = set(payload)
        missing = [name for name in self._inputs if name not in given]
        if missing:
            raise BadRequest(f"missing inference input(s) {missing}")
        unexpected = sorted(given - set(self._inputs))
        if unexpected:
            raise BadRequest(
                f"unexpected inference input(s) {unexpected}; the model takes {list(self._inputs)}"
            )
        feed: dict[str, Any] = {}
        for name, spec in self._inputs.items():
            tensor = payload.input(name)
            if tensor.datatype != spec.datatype:
                raise BadRequest(
                    f"input {name!r}: datatype {tensor.datatype} does not match the model's "
                    f"{spec.datatype}"
                )
            array = decode_input(tensor, self.settings, default="np")
            if spec.datatype == "BYTES":
                # ONNX Runtime takes strings, not bytes, for tensor(string).
                array = np.asarray(array, dtype=object)
                text = [
                    item.decode("utf-8") if isinstance(item, bytes) else item
                    for item in array.reshape(-1).tolist()
                ]
                array = np.array(text, dtype=object).reshape(tensor.shape)
            feed[name] = array
        return feed

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        names = self.wanted_outputs(payload, self._outputs)
        results = self._session.run(names, self._feed(payload))
        return self.respond(payload, dict(zip(names, results, strict=True)))
