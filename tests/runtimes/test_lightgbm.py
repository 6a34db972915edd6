"""LightGBMModel: a text booster, one ``predict`` output shaped by the objective."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from v2mount.errors import BadRequest, SettingsError
from v2mount.runtimes import LightGBMModel


def test_multiclass_answers_like_lightgbm(
    load_example: Callable[..., Any],
    infer: Callable[..., Any],
    make_tensor: Callable[..., Any],
    example_repository: Path,
    iris: np.ndarray,
) -> None:
    model = load_example("lightgbm-iris")
    assert model.settings.platform == "lightgbm"
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("predict", "FP64", [-1, 3])
    ]
    booster = lgb.Booster(model_file=example_repository / "lightgbm-iris" / "model.txt")
    outputs = infer(model, make_tensor("x", iris))
    np.testing.assert_array_equal(outputs["predict"].data, booster.predict(iris))
    with pytest.raises(BadRequest, match="'predict_proba' was requested"):
        infer(model, make_tensor("x", iris), outputs=["predict_proba"])


def test_binary_objective_and_declared_outputs(
    tmp_path: Path,
    iris: np.ndarray,
    infer: Callable[..., Any],
    make_tensor: Callable[..., Any],
) -> None:
    params = {"objective": "binary", "num_leaves": 4, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(iris, np.arange(150) % 2), num_boost_round=3)
    booster.save_model(tmp_path / "model.txt")
    model = LightGBMModel(name="binary", parameters={"uri": str(tmp_path)})
    model.load()
    assert [(s.name, s.shape) for s in model.settings.outputs] == [("predict", [-1])]
    outputs = infer(model, make_tensor("x", iris[:4]))
    np.testing.assert_array_equal(outputs["predict"].data, booster.predict(iris[:4]))
    declared = [{"name": "score", "datatype": "FP64", "shape": [-1]}]
    with pytest.raises(SettingsError, match="offers \\['predict'\\]"):
        LightGBMModel(name="b", parameters={"uri": str(tmp_path)}, outputs=declared).load()
