"""Event-loop plumbing shared by the batchers: which loop runs, and tasks no caller owns."""

from __future__ import annotations

import asyncio
import contextvars
import copy
from collections.abc import Callable, Coroutine, Hashable
from typing import Any

try:
    import sniffio
except ModuleNotFoundError:  # pragma: no cover - trio needs sniffio: only asyncio runs here
    sniffio = None  # type: ignore[assignment]

__all__ = ["Spawner", "current_loop", "fresh"]


def current_loop() -> tuple[Hashable, bool]:
    """The running event loop (batches never span two) and whether it is trio's."""
    if sniffio is not None and sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token(), True
    return asyncio.get_running_loop(), False


class Spawner:
    """Starts tasks that no caller owns: an asyncio task (held here, as the loop holds
    tasks weakly) or a trio system task. Call from the loop's own thread."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, function: Callable[[], Coroutine[Any, Any, None]], trio: bool) -> None:
        if trio:
            import trio as trio_module

            trio_module.lowlevel.spawn_system_task(function, context=contextvars.copy_context())
            return
        task = asyncio.get_running_loop().create_task(function())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def fresh(error: BaseException) -> BaseException:
    """A copy per waiting caller, so one exception's traceback is not grown by many raises."""
    try:
        clone = copy.copy(error)
    except Exception:
        return error
    clone.__cause__ = error.__cause__
    return clone
