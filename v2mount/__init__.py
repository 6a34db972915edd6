"""v2mount: serve Python models over the Open Inference Protocol from any ASGI app.

``uvicorn v2mount:app`` serves the repository named by ``V2MOUNT_MODEL_REPOSITORY``
(or the bundled demo models). ``v2mount.app`` builds a new app on each access (it is
not in ``__all__``, so ``import *`` builds none) and sets up v2mount's logging, as a
standalone server's entry point; nothing is built or configured at import.
"""

from __future__ import annotations

from typing import Any

from v2mount.model import Model
from v2mount.rest import V2App, V2Middleware
from v2mount.settings import ModelSettings, Settings, TensorSpec
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

__all__ = [
    "InferenceRequest",
    "InferenceResponse",
    "Model",
    "ModelSettings",
    "RequestedOutput",
    "Settings",
    "Tensor",
    "TensorSpec",
    "V2App",
    "V2Middleware",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from v2mount.standalone import standalone_app

        return standalone_app()
    raise AttributeError(f"module 'v2mount' has no attribute {name!r}")
