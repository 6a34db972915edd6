"""OnnxModel: metadata read from the file, thread options, inputs checked by name and type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from v2mount.errors import BadRequest, SettingsError
from v2mount.runtimes import OnnxModel


def save(tmp_path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> Path:
    graph = helper.make_graph(nodes, "test", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_metadata_and_answers_from_the_file(
    load_example: Callable[..., Any],
    infer: Callable[..., Any],
    make_tensor: Callable[..., Any],
    example_repository: Path,
    iris: np.ndarray,
) -> None:
    model = load_example("onnx-iris", threads_per_worker=2)
    assert model.settings.platform == "onnxruntime_onnx"
    assert [(s.name, s.datatype, s.shape) for s in model.settings.inputs] == [
        ("input", "FP32", [-1, 4])
    ]
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 3]),
    ]
    options = model._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)

    graph = onnx.load(example_repository / "onnx-iris" / "model.onnx").graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    features = iris.astype(np.float32)
    logits = features @ weights["weights"] + weights["bias"]
    outputs = infer(model, make_tensor("input", features))
    assert outputs["label"].data.tolist() == logits.argmax(axis=1).tolist()
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"].data, softmax, rtol=1e-5)
    assert list(infer(model, make_tensor("input", features[:2]), outputs=["label"])) == ["label"]


def test_inputs_are_checked(
    load_example: Callable[..., Any], infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = load_example("onnx-iris")
    row = [[5.1, 3.5, 1.4, 0.2]]
    with pytest.raises(BadRequest, match="datatype FP64 does not match the model's FP32"):
        infer(model, make_tensor("input", row))
    with pytest.raises(BadRequest, match=r"unexpected inference input\(s\) \['other'\]"):
        infer(model, make_tensor("input", row, "FP32"), make_tensor("other", row, "FP32"))
    with pytest.raises(BadRequest, match=r"missing inference input\(s\) \['input'\]"):
        infer(model, make_tensor("x", np.asarray(row, np.float32)))
    with pytest.raises(BadRequest, match="offers the outputs 'label', 'probabilities'"):
        infer(model, make_tensor("input", np.asarray(row, np.float32)), outputs=["predict"])


def test_strings_and_non_tensor_outputs(
    tmp_path: Path, infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    path = save(
        tmp_path,
        [
            helper.make_node("Identity", ["text"], ["echo"]),
            helper.make_node("SequenceConstruct", ["text"], ["listed"]),
        ],
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [
            helper.make_tensor_value_info("echo", TensorProto.STRING, [None]),
            helper.make_tensor_sequence_value_info("listed", TensorProto.STRING, [None]),
        ],
    )
    model = OnnxModel(name="strings", parameters={"uri": str(path)})
    model.load()
    assert [(s.name, s.datatype, s.shape) for s in model.settings.inputs] == [
        ("text", "BYTES", [-1])
    ]
    assert [s.name for s in model.settings.outputs] == ["echo"]  # the sequence is left out
    echo = infer(model, make_tensor("text", ["héllo", "w"]))["echo"]
    assert (echo.datatype, echo.data.tolist()) == ("BYTES", ["héllo".encode(), b"w"])
    decoded = infer(model, make_tensor("text", ["x"], content_type="str"))["echo"]
    assert decoded.data.tolist() == [b"x"]


def test_declared_metadata_must_match_the_file(load_example: Callable[..., Any]) -> None:
    with pytest.raises(SettingsError, match=r"declares inputs \['features'\]"):
        load_example("onnx-iris", inputs=[{"name": "features", "datatype": "FP32", "shape": [-1]}])
    declared = [{"name": "label", "datatype": "INT64", "shape": [-1]}]
    model = load_example("onnx-iris", outputs=declared)
    assert [s.name for s in model.settings.outputs] == ["label"]
