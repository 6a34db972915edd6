"""Train and save every example model under examples/runtimes/, offline.

    python examples/runtimes/build.py            # writes next to each model-settings.json
    python examples/runtimes/build.py --out DIR  # a copy of the whole repository in DIR

All models learn scikit-learn's bundled iris data set (no download). The ONNX model is
the scikit-learn logistic regression's weights written as an ONNX graph with onnx's
helper, so no converter is needed. Needs the extras: scikit-learn, xgboost, lightgbm,
onnx (to write the graph) and onnxruntime (to serve it).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: What build() writes, per example folder (the other files in a folder are committed).
ARTEFACTS = {
    "sklearn-iris": "model.joblib",
    "xgboost-iris": "model.json",
    "lightgbm-iris": "model.txt",
    "onnx-iris": "model.onnx",
}


def _iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    return features.astype(np.float64), labels.astype(np.int64)


def build_sklearn(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(features, labels)
    joblib.dump(model, folder / ARTEFACTS["sklearn-iris"])


def build_xgboost(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    import xgboost as xgb

    model = xgb.XGBClassifier(n_estimators=10, max_depth=2, n_jobs=1)
    model.fit(features, labels)
    model.save_model(folder / ARTEFACTS["xgboost-iris"])


def build_lightgbm(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    import lightgbm as lgb

    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 4, "verbose": -1}
    params["num_threads"] = 1
    booster = lgb.train(params, lgb.Dataset(features, labels), num_boost_round=10)
    booster.save_model(folder / ARTEFACTS["lightgbm-iris"])


def build_onnx(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    weights = classifier.coef_.T.astype(np.float32)  # [4, 3]
    bias = classifier.intercept_.astype(np.float32)  # [3]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "iris_logistic_regression",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by onnxruntime releases from 2021 on
    onnx.checker.check_model(model)
    onnx.save(model, folder / ARTEFACTS["onnx-iris"])


BUILDERS = {
    "sklearn-iris": build_sklearn,
    "xgboost-iris": build_xgboost,
    "lightgbm-iris": build_lightgbm,
    "onnx-iris": build_onnx,
}


def build(out: Path = HERE, only: list[str] | None = None) -> Path:
    """Write the example repository to ``out`` (default: in place); returns ``out``."""
    features, labels = _iris()
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in HERE.iterdir() if (p / "model-settings.json").is_file()):
        if only is not None and folder.name not in only:
            continue
        target = out / folder.name
        if target.resolve() != folder:
            shutil.copytree(folder, target, dirs_exist_ok=True, ignore=_ignored)
        builder = BUILDERS.get(folder.name)
        if builder is not None:
            builder(target, features, labels)
    return out


def _ignored(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name in ARTEFACTS.values() or name == "__pycache__"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the repository")
    parser.add_argument("names", nargs="*", help="example folders to build (default: all)")
    args = parser.parse_args()
    out = build(args.out, args.names or None)
    print(f"built the example models in {out}")


if __name__ == "__main__":
    main()
