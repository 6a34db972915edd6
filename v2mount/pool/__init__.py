"""Pools of worker processes (``parallel_workers > 0``): per model, or shared.

``WorkerPool`` implements ``v2mount.runner.Runner``: the model is loaded once in each of
N ``multiprocess`` workers (spawn context), requests wait in one bounded queue and go to
an idle worker, large numpy buffers cross by shared memory, dead workers are replaced.
A ``SharedPool``'s workers load several models, each served by its ``PoolMember`` (a
``Runner`` too). ``PoolConfig`` holds a pool's settings. See
``docs/parallel-inference.md``.

Both are imported on first use, so that a worker process, which imports this package
only for the code it runs, does not pay for the parent's side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from v2mount.pool._config import PoolConfig
    from v2mount.pool._pool import PoolMember, SharedPool, WorkerPool

__all__ = ["PoolConfig", "PoolMember", "SharedPool", "WorkerPool"]


def __getattr__(name: str) -> Any:
    if name in ("PoolMember", "SharedPool", "WorkerPool"):
        from v2mount.pool import _pool

        return getattr(_pool, name)
    if name == "PoolConfig":
        from v2mount.pool._config import PoolConfig

        return PoolConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
