"""Models the preload tests run (loaded by path: the template executes this file).

``Probe.load`` reads, for each module its pool preloads, the pid that module recorded
when it was imported (``IMPORTED_IN``), before ``load`` imports anything itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from v2mount.model import Model, preload_modules
from v2mount.types import InferenceRequest

#: The module ``Probe`` preloads; the tests write it into a folder on ``sys.path``.
PROBE = "v2mount_preload_probe"


class Probe(Model):
    """Answers which process imported each preloaded module, and which process it is."""

    name = "probe"
    preload = (PROBE,)

    def load(self) -> None:
        self.imported_in = [
            getattr(sys.modules.get(name), "IMPORTED_IN", 0) for name in preload_modules(self)
        ]

    def predict(self, payload: InferenceRequest) -> Any:
        return {
            "imported_in": np.array(self.imported_in),
            "pid": np.array([os.getpid()]),
            "ppid": np.array([os.getppid()]),
        }
