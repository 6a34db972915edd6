"""SKLearnModel: outputs chosen by the request, metadata from the estimator, pd requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import make_column_transformer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from v2mount.errors import BadRequest, SettingsError
from v2mount.runtimes import SKLearnModel


def saved(tmp_path: Path, estimator: Any, filename: str = "model.joblib") -> Path:
    path = tmp_path / filename
    joblib.dump(estimator, path)
    return path


def test_declares_outputs_and_answers_like_the_estimator(
    load_example: Callable[..., Any],
    infer: Callable[..., Any],
    make_tensor: Callable[..., Any],
    example_repository: Path,
    iris: np.ndarray,
) -> None:
    model = load_example("sklearn-iris")
    assert model.settings.platform == "sklearn"
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("predict", "INT64", [-1]),
        ("predict_proba", "FP64", [-1, 3]),
    ]
    assert model.settings.inputs == []  # any single input name is accepted
    expected = joblib.load(example_repository / "sklearn-iris" / "model.joblib")
    outputs = infer(model, make_tensor("features", iris))
    assert list(outputs) == ["predict", "predict_proba"]
    np.testing.assert_array_equal(outputs["predict"].data, expected.predict(iris))
    np.testing.assert_array_equal(outputs["predict_proba"].data, expected.predict_proba(iris))
    assert outputs["predict"].datatype == "INT64"
    assert outputs["predict_proba"].shape == (150, 3)


def test_requested_outputs_only(
    load_example: Callable[..., Any], infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = load_example("sklearn-iris")
    outputs = infer(model, make_tensor("x", [[5.1, 3.5, 1.4, 0.2]]), outputs=["predict_proba"])
    assert list(outputs) == ["predict_proba"]
    assert outputs["predict_proba"].data.sum() == pytest.approx(1.0)
    with pytest.raises(BadRequest, match="offers the outputs 'predict', 'predict_proba'; "):
        infer(model, make_tensor("x", [[5.1, 3.5, 1.4, 0.2]]), outputs=["transform"])


def test_one_input_unless_pd(
    load_example: Callable[..., Any], infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = load_example("sklearn-iris")
    with pytest.raises(BadRequest, match="exactly one input; this one has 2"):
        infer(model, make_tensor("a", [[1.0, 2, 3, 4]]), make_tensor("b", [[1.0, 2, 3, 4]]))


def test_pd_request_feeds_a_dataframe(
    tmp_path: Path, infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    frame = pd.DataFrame(
        {"colour": ["red", "blue", "red", "green"] * 5, "size": np.arange(20, dtype=float)}
    )
    labels = (frame["colour"] == "red").to_numpy()
    pipeline = make_pipeline(
        make_column_transformer(
            (OneHotEncoder(), ["colour"]),
            ("passthrough", ["size"]),
            verbose_feature_names_out=False,
        ),
        LogisticRegression(),
    ).fit(frame, labels)
    model = SKLearnModel(name="colours", parameters={"uri": str(saved(tmp_path, pipeline))})
    model.load()
    assert model.settings.outputs[0].datatype == "BOOL"
    outputs = infer(
        model,
        make_tensor("colour", ["red", "blue"]),
        make_tensor("size", [[1.0], [2.0]]),  # [N, 1] inputs become plain columns
        parameters={"content_type": "pd"},
    )
    expected = pipeline.predict(pd.DataFrame({"colour": ["red", "blue"], "size": [1.0, 2.0]}))
    np.testing.assert_array_equal(outputs["predict"].data, expected)
    assert outputs["predict"].datatype == "BOOL"


def test_string_labels_regressors_and_transformers(
    tmp_path: Path, iris: np.ndarray, infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    names = np.array(["setosa", "versicolor", "virginica"])[np.arange(150) % 3]
    classifier = LogisticRegression(max_iter=300).fit(iris, names)
    model = SKLearnModel(name="labels", parameters={"uri": str(saved(tmp_path, classifier))})
    model.load()
    assert (model.settings.outputs[0].name, model.settings.outputs[0].datatype) == (
        "predict",
        "BYTES",
    )
    outputs = infer(model, make_tensor("x", iris[:2]), outputs=["predict"])
    assert outputs["predict"].datatype == "BYTES"
    assert outputs["predict"].data.tolist() == [
        label.encode() for label in classifier.predict(iris[:2])
    ]

    regressor = LinearRegression().fit(iris[:, :3], iris[:, 3])
    model = SKLearnModel(
        name="reg", parameters={"uri": str(saved(tmp_path, regressor, "model.pkl"))}
    )
    model.load()
    assert [(s.name, s.datatype, s.shape) for s in model.settings.outputs] == [
        ("predict", "FP64", [-1])
    ]
    with pytest.raises(BadRequest, match="'predict_proba' was requested"):
        infer(model, make_tensor("x", iris[:2, :3]), outputs=["predict_proba"])

    scaler = StandardScaler().fit(iris)
    folder = tmp_path / "scaler"
    folder.mkdir()
    saved(folder, scaler, "model.pickle")
    model = SKLearnModel(name="scaler", parameters={"uri": str(folder)})  # a folder: well-known
    model.load()
    assert [(s.name, s.shape) for s in model.settings.outputs] == [("transform", [-1, -1])]
    outputs = infer(model, make_tensor("x", iris.astype(np.float32)))
    assert outputs["transform"].datatype == "FP64"  # declared FP64: float32 is cast up
    np.testing.assert_allclose(outputs["transform"].data, scaler.transform(iris), atol=1e-6)


def test_declared_outputs_narrow_the_default(
    load_example: Callable[..., Any], infer: Callable[..., Any], make_tensor: Callable[..., Any]
) -> None:
    model = load_example(
        "sklearn-iris", outputs=[{"name": "predict", "datatype": "INT64", "shape": [-1]}]
    )
    assert list(infer(model, make_tensor("x", [[5.1, 3.5, 1.4, 0.2]]))) == ["predict"]
    with pytest.raises(SettingsError, match=r"declares outputs \['decision'\]"):
        load_example(
            "sklearn-iris", outputs=[{"name": "decision", "datatype": "FP64", "shape": [-1]}]
        )


def test_missing_files_say_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SKLearnModel(name="m", parameters={"uri": str(tmp_path / "nope.joblib")}).load()
    with pytest.raises(FileNotFoundError, match=r"looked for model\.joblib, model\.pickle"):
        SKLearnModel(name="m", parameters={"uri": str(tmp_path)}).load()
    with pytest.raises(FileNotFoundError, match=r"set parameters\.uri"):
        SKLearnModel(name="m").load()
