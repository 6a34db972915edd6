"""XGBoostModel: native .json/.ubj files, classifier or regressor by objective, threads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from sklearn.datasets import load_diabetes

from v2mount.errors import BadRequest
from v2mount.runtimes import XGBoostModel


def test_classifier_answers_like_xgboost(
    load_example: Callable[..., Any],
    infer: Callable[..., Any],
    make_tensor: Callable[..., Any],
    example_repository: Path,
    iris: np.ndarray,
) -> None:
    model = load_example("xgboost-iris")
    assert model.settings.platform == "xgboost"
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("predict", "INT64", [-1]),
        ("predict_proba", "FP32", [-1, 3]),
    ]
    expected = xgb.XGBClassifier()
    expected.load_model(example_repository / "xgboost-iris" / "model.json")
    outputs = infer(model, make_tensor("x", iris))
    np.testing.assert_array_equal(outputs["predict"].data, expected.predict(iris))
    np.testing.assert_array_equal(outputs["predict_proba"].data, expected.predict_proba(iris))
    assert list(infer(model, make_tensor("x", iris[:1]), outputs=["predict"])) == ["predict"]


def test_regressor_from_ubj_with_threads(
    tmp_path: Path, infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    features, target = load_diabetes(return_X_y=True)
    booster = xgb.train(
        {"objective": "reg:squarederror", "nthread": 1}, xgb.DMatrix(features, target), 5
    )
    booster.save_model(tmp_path / "model.ubj")  # the plain Booster API, binary JSON
    model = XGBoostModel(name="diabetes", parameters={"uri": str(tmp_path)}, threads_per_worker=2)
    model.load()
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("predict", "FP32", [-1])
    ]
    config = json.loads(model._estimator.get_booster().save_config())
    assert config["learner"]["generic_param"]["nthread"] == "2"
    outputs = infer(model, make_tensor("x", features[:5]))
    np.testing.assert_allclose(
        outputs["predict"].data, booster.inplace_predict(features[:5]), rtol=1e-6
    )
    with pytest.raises(BadRequest, match="'predict_proba' was requested"):
        infer(model, make_tensor("x", features[:5]), outputs=["predict_proba"])
