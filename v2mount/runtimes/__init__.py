"""Ready-made models for common frameworks, and MLServer's names for them.

| class | extra | MLServer ``implementation`` |
| --- | --- | --- |
| ``SKLearnModel`` | ``v2mount[sklearn]`` | ``mlserver_sklearn.SKLearnModel`` |
| ``XGBoostModel`` | ``v2mount[xgboost]`` | ``mlserver_xgboost.XGBoostModel`` |
| ``LightGBMModel`` | ``v2mount[lightgbm]`` | ``mlserver_lightgbm.LightGBMModel`` |
| ``OnnxModel`` | ``v2mount[onnx]`` | ``mlserver_onnx.OnnxModel`` |
| ``CallableModel`` | — | — |

Each framework is imported when a model is loaded, never at import: importing this
package (or pickling a runtime into a worker) needs none of them. Each runtime names
its framework in ``preload``, so a pool's template imports it once before forking the
workers (``v2mount/pool/_template.py``).
"""

from __future__ import annotations

from v2mount.runtimes.callable import CallableModel
from v2mount.runtimes.lightgbm import LightGBMModel
from v2mount.runtimes.onnx import OnnxModel
from v2mount.runtimes.sklearn import SKLearnModel
from v2mount.runtimes.xgboost import XGBoostModel

__all__ = [
    "ALIASES",
    "CallableModel",
    "LightGBMModel",
    "OnnxModel",
    "SKLearnModel",
    "XGBoostModel",
]

_OURS = {
    "sklearn": "v2mount.runtimes.sklearn.SKLearnModel",
    "xgboost": "v2mount.runtimes.xgboost.XGBoostModel",
    "lightgbm": "v2mount.runtimes.lightgbm.LightGBMModel",
    "onnx": "v2mount.runtimes.onnx.OnnxModel",
}

#: MLServer ``implementation`` names (package-level and module-level spellings) → ours.
ALIASES: dict[str, str] = {
    "mlserver_sklearn.SKLearnModel": _OURS["sklearn"],
    "mlserver_sklearn.sklearn.SKLearnModel": _OURS["sklearn"],
    "mlserver_xgboost.XGBoostModel": _OURS["xgboost"],
    "mlserver_xgboost.xgboost.XGBoostModel": _OURS["xgboost"],
    "mlserver_lightgbm.LightGBMModel": _OURS["lightgbm"],
    "mlserver_lightgbm.lightgbm.LightGBMModel": _OURS["lightgbm"],
    "mlserver_onnx.OnnxModel": _OURS["onnx"],
    "mlserver_onnx.onnx.OnnxModel": _OURS["onnx"],
}
