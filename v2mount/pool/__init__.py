"""Per-model pools of worker processes (``parallel_workers > 0``).

``WorkerPool`` implements ``v2mount.runner.Runner``: the model is loaded once in each of
N ``multiprocess`` workers (spawn context), requests wait in one bounded queue and go to
an idle worker, large numpy buffers cross by shared memory, dead workers are replaced.
See ``docs/parallel-inference.md``.
"""

from __future__ import annotations

from v2mount.pool._pool import WorkerPool

__all__ = ["WorkerPool"]
