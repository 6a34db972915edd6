"""Train the iris classifier this folder serves, offline, from scikit-learn's bundled data.

    python examples/models/iris/train.py                     # writes model.joblib here
    python examples/models/iris/train.py --output FILE       # or anywhere else

Needs the extra ``v2mount[sklearn]`` (scikit-learn and joblib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent


def train(output: Path) -> float:
    """Fit, save to ``output``, and return the accuracy on the training data."""
    features, labels = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(features, labels)
    joblib.dump(model, output)
    return float(model.score(features, labels))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "model.joblib")
    args = parser.parse_args(argv)
    accuracy = train(args.output)
    print(f"wrote {args.output} (training accuracy {accuracy:.3f})")


if __name__ == "__main__":
    main()
