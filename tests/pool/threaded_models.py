"""A model whose module starts a thread when imported: no template may fork it."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from v2mount.model import Model
from v2mount.types import InferenceRequest

threading.Thread(target=threading.Event().wait, name="started-at-import", daemon=True).start()


class Threaded(Model):
    name = "threaded"

    def predict(self, payload: InferenceRequest) -> Any:
        return {"ppid": np.array([os.getppid()])}
