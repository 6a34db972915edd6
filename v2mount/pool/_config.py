"""``PoolConfig``: everything a pool needs to know about its model's settings, fixed at once."""

from __future__ import annotations

from dataclasses import dataclass

from v2mount.settings import ModelSettings, Settings

__all__ = ["PoolConfig"]


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A pool's configuration, built once from the model's effective settings.

    ``workers`` processes each limit their native thread pools to ``threads_per_worker``
    (``None``: leave them alone); at most ``max_queue_size`` requests wait for a worker;
    numpy buffers of at least ``shm_threshold`` bytes cross by shared memory. A worker
    running one request for more than ``hard_timeout`` seconds is killed; one that
    answered ``max_requests_per_worker`` requests, or whose resident memory passed
    ``max_worker_memory_mb`` (Linux), is replaced (``None``: never).
    """

    workers: int
    max_queue_size: int
    shm_threshold: int = 64 * 1024
    threads_per_worker: int | None = 1
    hard_timeout: float | None = None
    max_requests_per_worker: int | None = None
    max_worker_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")

    @classmethod
    def from_settings(cls, effective: ModelSettings, server: Settings) -> PoolConfig:
        """The pool of a model whose settings have every default filled in already.

        The hard timeout is twice the inference timeout: by then the caller has answered
        504 and the worker is stuck, not slow.
        """
        assert effective.parallel_workers is not None and effective.max_queue_size is not None
        assert effective.inference_timeout is not None
        return cls(
            workers=effective.parallel_workers,
            max_queue_size=effective.max_queue_size,
            shm_threshold=server.shm_threshold_bytes,
            threads_per_worker=effective.threads_per_worker,
            hard_timeout=2 * effective.inference_timeout,
            max_requests_per_worker=effective.max_requests_per_worker or None,
            max_worker_memory_mb=effective.max_worker_memory_mb or None,
        )
