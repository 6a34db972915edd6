"""``XGBoostModel``: an XGBoost model in its native format (``.json``, ``.ubj``).

Like MLServer's ``mlserver_xgboost.XGBoostModel``: the file is loaded through
XGBoost's scikit-learn interface (a classifier when its objective is ``binary:*`` or
``multi:*``, else a regressor), and the outputs are ``predict`` and, for classifiers,
``predict_proba``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from v2mount.codecs.content import decode_request
from v2mount.errors import SettingsError
from v2mount.runtimes._base import FrameworkModel, import_extra
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["XGBoostModel"]


class XGBoostModel(FrameworkModel):
    """Serves a saved XGBoost booster (extra ``v2mount[xgboost]``).

    ``load`` reads ``parameters.uri`` (``model.json``, ``model.ubj`` or ``model.bst``
    in a folder) and sets the booster's ``nthread`` to ``threads_per_worker``; that
    setting belongs to this booster only, so nothing else in the process is touched.
    """

    platform = "xgboost"
    any_input_name = True
    well_known_files = ("model.json", "model.ubj", "model.bst")
    preload: ClassVar[tuple[str, ...]] = ("xgboost",)

    def load(self) -> None:
        xgb = import_extra("xgboost", "xgboost")
        path = str(self.model_path())
        config = json.loads(xgb.Booster(model_file=path).save_config())["learner"]
        objective: str = config["objective"]["name"]
        classifier = objective.startswith(("binary:", "multi:"))
        estimator = xgb.XGBClassifier() if classifier else xgb.XGBRegressor()
        estimator.load_model(path)
        estimator.set_params(n_jobs=self.threads)
        self._estimator: Any = estimator
        self._methods = ["predict", "predict_proba"] if classifier else ["predict"]
        unknown = [s.name for s in self.settings.outputs if s.name not in self._methods]
        if unknown:
            raise SettingsError(
                f"model {self.settings.name!r} declares outputs {unknown}; "
                f"this {objective} model offers {self._methods}"
            )
        if not self.settings.outputs:
            targets = int(config["learner_model_param"].get("num_target", "1"))
            if classifier:
                self.settings.outputs = [
                    TensorSpec(name="predict", datatype="INT64", shape=[-1]),
                    TensorSpec(
                        name="predict_proba",
                        datatype="FP32",
                        shape=[-1, max(int(estimator.n_classes_), 2)],
                    ),
                ]
            else:
                shape = [-1] if targets == 1 else [-1, targets]
                self.settings.outputs = [TensorSpec(name="predict", datatype="FP32", shape=shape)]

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        names = self.wanted_outputs(payload, self._methods)
        features = decode_request(payload, self.settings, default="np")
        values = {name: getattr(self._estimator, name)(features) for name in names}
        return self.respond(payload, values)
