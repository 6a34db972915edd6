"""Per-model pools of worker processes (``parallel_workers > 0``).

``WorkerPool`` implements ``v2mount.runner.Runner``: the model is loaded once in each of
N ``multiprocess`` workers (spawn context), requests wait in one bounded queue and go to
an idle worker, large numpy buffers cross by shared memory, dead workers are replaced.
``PoolConfig`` holds a pool's settings. See ``docs/parallel-inference.md``.

Both are imported on first use, so that a worker process, which imports this package
only for the code it runs, does not pay for the parent's side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from v2mount.pool._config import PoolConfig
    from v2mount.pool._pool import WorkerPool

__all__ = ["PoolConfig", "WorkerPool"]


def __getattr__(name: str) -> Any:
    if name == "WorkerPool":
        from v2mount.pool._pool import WorkerPool

        return WorkerPool
    if name == "PoolConfig":
        from v2mount.pool._config import PoolConfig

        return PoolConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
