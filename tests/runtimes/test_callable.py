"""CallableModel: a function from parameters.function, a module file, or a Python object."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from v2mount.errors import SettingsError
from v2mount.runtimes import CallableModel
from v2mount.types import InferenceResponse, Tensor


def test_example_function_next_to_its_settings(
    load_example: Callable[..., Any], infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = load_example("callable-iris")  # iris_rules.py is not importable: found by file
    assert model.settings.platform == "python"
    outputs = infer(
        model,
        make_tensor("petal_length", [1.4, 4.5, 6.0]),
        make_tensor("petal_width", [0.2, 1.5, 2.5]),
    )
    species = outputs["species"]
    assert (species.datatype, species.shape) == ("BYTES", (3, 1))
    assert species.data.ravel().tolist() == [b"setosa", b"versicolor", b"virginica"]
    assert species.parameters == {"content_type": "str"}


def test_python_callables_and_what_they_may_return(
    infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = CallableModel(name="double", function=lambda inputs: {"y": inputs["x"] * 2})
    model.load()
    assert infer(model, make_tensor("x", [1.0, 2.0]))["y"].data.tolist() == [2.0, 4.0]

    single = CallableModel(
        name="sum",
        function=lambda inputs: inputs["x"].sum(axis=1),
        outputs=[{"name": "total", "datatype": "FP32", "shape": [-1]}],
    )
    single.load()
    total = infer(single, make_tensor("x", [[1, 2], [3, 4]], "INT64"))["total"]
    assert (total.datatype, total.data.tolist()) == ("FP32", [3.0, 7.0])

    unnamed = CallableModel(name="first", function=lambda inputs: inputs["x"][:1])
    unnamed.load()
    assert list(infer(unnamed, make_tensor("x", [5.0, 6.0]))) == ["output-0"]

    def frame(data: pd.DataFrame) -> pd.DataFrame:
        return data.assign(area=data["w"] * data["h"])

    table = CallableModel(name="table", function=frame, parameters={"content_type": "pd"})
    table.load()
    outputs = infer(table, make_tensor("w", [1.0, 2.0]), make_tensor("h", [3.0, 4.0]))
    assert list(outputs) == ["w", "h", "area"]
    assert outputs["area"].data.tolist() == [3.0, 8.0]

    def full(inputs: dict[str, np.ndarray]) -> InferenceResponse:
        data = np.asarray([len(inputs)], dtype=np.int32)
        return InferenceResponse("ignored", [Tensor("n", "INT32", (1,), data)])

    whole = CallableModel(name="whole", function=full)
    whole.load()
    assert infer(whole, make_tensor("a", [1.0]))["n"].data.tolist() == [1]


def test_function_by_name(
    tmp_path: Path, infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    (tmp_path / "scoring_module_for_test.py").write_text(
        "def upper(inputs):\n    return {'text': [s.upper() for s in inputs['text']]}\n"
    )
    for reference in ("scoring_module_for_test:upper", "scoring_module_for_test.upper"):
        model = CallableModel(
            {
                "name": "upper",
                "parameters": {"function": reference},
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [-1],
                        "parameters": {"content_type": "str"},
                    }
                ],
                "source_dir": tmp_path,
            }
        )
        model.load()
        text = infer(model, make_tensor("text", ["a", "bé"]))["text"]
        assert text.data.ravel().tolist() == [b"A", "BÉ".encode()]

    np_module = CallableModel(name="np", parameters={"function": "numpy.atleast_1d"})
    np_module.load()  # importable modules need no source_dir


def test_mistakes_fail_at_construction_or_load(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="needs a function"):
        CallableModel(name="none")
    with pytest.raises(SettingsError, match="is not callable"):
        CallableModel(name="number", function=42)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"'module:function' or 'module\.function'"):
        CallableModel(name="bad", parameters={"function": "nodots"}).load()
    with pytest.raises(ModuleNotFoundError):
        CallableModel(
            name="missing", parameters={"function": "no_such_module:f"}, source_dir=tmp_path
        ).load()

    async def coroutine(inputs: Any) -> Any:
        return inputs

    with pytest.raises(TypeError, match="async function"):
        CallableModel(name="async", function=coroutine).load()
