"""``LightGBMModel``: a LightGBM booster saved as text (``model.txt``).

Like MLServer's ``mlserver_lightgbm.LightGBMModel``: one output, ``predict``, which is
``Booster.predict`` (class probabilities ``[N, K]`` for a multiclass objective).
"""

from __future__ import annotations

from typing import Any, ClassVar

from v2mount.codecs.content import decode_request
from v2mount.errors import SettingsError
from v2mount.runtimes._base import FrameworkModel, import_extra
from v2mount.settings import TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["LightGBMModel"]


class LightGBMModel(FrameworkModel):
    """Serves a saved LightGBM booster (extra ``v2mount[lightgbm]``).

    ``load`` reads ``parameters.uri`` (``model.txt`` or ``model.bst`` in a folder);
    each call passes ``num_threads=threads_per_worker`` to ``Booster.predict``, a
    per-call setting that touches nothing else in the process.
    """

    platform = "lightgbm"
    any_input_name = True
    well_known_files = ("model.txt", "model.bst")
    preload: ClassVar[tuple[str, ...]] = ("lightgbm",)

    def load(self) -> None:
        lgb = import_extra("lightgbm", "lightgbm")
        self._booster: Any = lgb.Booster(model_file=str(self.model_path()))
        unknown = [s.name for s in self.settings.outputs if s.name != "predict"]
        if unknown:
            raise SettingsError(
                f"model {self.settings.name!r} declares outputs {unknown}; "
                "LightGBMModel offers ['predict']"
            )
        if not self.settings.outputs:
            classes = int(self._booster.num_model_per_iteration())
            shape = [-1] if classes == 1 else [-1, classes]
            self.settings.outputs = [TensorSpec(name="predict", datatype="FP64", shape=shape)]

    def predict(self, payload: InferenceRequest) -> InferenceResponse:
        self.wanted_outputs(payload, ["predict"])
        features = decode_request(payload, self.settings, default="np")
        result = self._booster.predict(features, num_threads=self.threads)
        return self.respond(payload, {"predict": result})
