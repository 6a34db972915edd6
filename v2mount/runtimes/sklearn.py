"""``SKLearnModel``: a scikit-learn estimator saved with joblib or pickle.

Like MLServer's ``mlserver_sklearn.SKLearnModel``: the request decodes to one array
(or a DataFrame with content type ``pd``), and the outputs are the estimator's
``predict``, ``predict_proba`` and ``transform``, whichever it has. Unlike MLServer,
a request that names no outputs gets every declared output (the OIP rule), not just
``predict``; declare ``outputs`` in ``model-settings.json`` to narrow that.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from v2mount.codecs.content import decode_request
from v2mount.codecs.tensor import array_to_datatype
from v2mount.errors import SettingsError
from v2mount.runtimes._base import FrameworkModel, import_extra
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["SKLearnModel"]

METHODS = ("predict", "predict_proba", "transform")


def _output_specs(estimator: Any, methods: list[str]) -> list[TensorSpec]:
    """Metadata for each method's output, from the fitted estimator's attributes."""
    classes = getattr(estimator, "classes_", None)
    if isinstance(classes, list):  # multi-output classifiers keep one array per output
        classes = classes[0] if classes else None
    n_outputs = getattr(estimator, "n_outputs_", 1)
    specs = []
    for method in methods:
        if method == "predict":
            datatype = array_to_datatype(np.asarray(classes)) if classes is not None else "FP64"
            shape = [-1] if n_outputs == 1 else [-1, int(n_outputs)]
        elif method == "predict_proba":
            datatype = "FP64"
            shape = [-1, len(classes) if classes is not None and n_outputs == 1 else -1]
        else:
            datatype, shape = "FP64", [-1, -1]
        specs.append(TensorSpec(name=method, datatype=datatype, shape=shape))
    return specs


class SKLearnModel(FrameworkModel):
    """Serves a fitted scikit-learn estimator or pipeline (extra ``v2mount[sklearn]``).

    ``load`` reads the file with joblib (``model.joblib``, ``model.pickle`` or
    ``model.pkl`` when ``parameters.uri`` is a folder) and declares the outputs the
    estimator has. scikit-learn's native threads (BLAS, OpenMP) are process-wide: in a
    worker process the pool sizes them to ``threads_per_worker``; in-process
    (``parallel_workers: 0``) they are the host's and left alone. Only load a file you
    trust: unpickling runs code.
    """

    platform = "sklearn"
    any_input_name = True
    well_known_files = ("model.joblib", "model.pickle", "model.pkl")
    #: joblib and scikit-learn with the modules of the common estimators: what most
    #: files' unpickling imports (list others in the settings' ``preload``).
    preload: ClassVar[tuple[str, ...]] = (
        "joblib",
        "sklearn",
        "sklearn.compose",
        "sklearn.linear_model",
        "sklearn.pipeline",
        "sklearn.preprocessing",
    )

    def load(self) -> None:
        joblib = import_extra("joblib", "sklearn")
        self._estimator = joblib.load(self.model_path())
        self._methods = [m for m in METHODS if callable(getattr(self._estimator, m, None))]
        if not self._methods:
            raise TypeError(
                f"{type(self._estimator).__name__} has none of the methods {', '.join(METHODS)}"
            )
        unknown = [s.name for s in self.settings.outputs if s.name not in self._methods]
        if unknown:
            raise SettingsError(
                f"model {self.settings.name!r} declares outputs {unknown}; "
                f"{type(self._estimator).__name__} offers {self._methods}"
            )
        if not self.settings.outputs:
            self.settings.outputs = _output_specs(self._estimator, self._methods)

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        names = self.wanted_outputs(payload, self._methods)
        features = decode_request(payload, self.settings, default="np")
        values: dict[str, Any] = {}
        for name in names:
            result = getattr(self._estimator, name)(features)
            values[name] = result.toarray() if hasattr(result, "toarray") else result
        return self.respond(payload, values)
