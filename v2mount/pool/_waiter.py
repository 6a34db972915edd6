"""Waking one waiting task, on whatever event loop it runs, from the pool's monitor thread."""

from __future__ import annotations

import anyio
from anyio.lowlevel import current_token

__all__ = ["Waiter"]


class Waiter:
    """A one-shot wake-up made by the task that will wait on it.

    It captures that task's event loop (asyncio or trio) when created, so nothing
    long-lived is bound to a loop: each request may come from a different loop.
    ``fire`` may be called from any thread, never blocks, and is a no-op once the loop
    has finished. (``anyio.from_thread.run_sync`` would block the monitor thread until
    the loop ran the callback, coupling every worker of the pool to the slowest loop.)
    """

    __slots__ = ("_event", "_token")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._token = current_token()

    def fire(self) -> None:
        try:
            self._token.backend_class.run_sync_soon(self._event.set, (), self._token.native_token)
        except anyio.RunFinishedError:
            pass

    async def wait(self) -> None:
        await self._event.wait()
