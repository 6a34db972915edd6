"""Running a call on the app's trio loop from the gRPC server's asyncio loop.

grpc.aio needs asyncio. Under a trio host the gRPC server gets an asyncio loop in a
thread of its own, while models, runners and statistics stay on the trio loop that
started them (an ``async`` predict may hold resources bound to it). Each call goes
across as a trio system task and its outcome comes back through
``call_soon_threadsafe``: nothing blocks either loop, and cancelling the gRPC side
(client gone, deadline passed) cancels the trio task like a REST disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from v2mount.errors import ModelNotReady

__all__ = ["TrioLoop"]

T = TypeVar("T")


class _Call:
    __slots__ = ("cancelled", "scope")

    def __init__(self) -> None:
        self.cancelled = False
        self.scope: trio.CancelScope | None = None

    def cancel(self) -> None:  # on the trio thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TrioLoop:
    """A handle on a running trio loop; ``call`` is awaited on another thread's asyncio loop."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    @classmethod
    def current(cls) -> TrioLoop:
        """The trio loop of the calling task."""
        return cls(trio.lowlevel.current_trio_token())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the trio loop; raises what it raised.

        ``ModelNotReady`` when the trio loop is gone or ends first.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        call = _Call()

        def deliver(outcome: tuple[bool, Any]) -> None:  # on the trio thread
            def resolve() -> None:
                if not future.done():
                    future.set_result(outcome)

            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the gRPC loop is closed: nobody waits any more
                pass

        async def run() -> None:
            outcome: tuple[bool, Any] = (False, ModelNotReady("the server is stopping"))
            try:
                with trio.CancelScope() as scope:
                    call.scope = scope
                    if call.cancelled:
                        scope.cancel()
                    try:
                        outcome = (True, await fn(*args))
                    except Exception as exc:
                        outcome = (False, exc)
            finally:
                deliver(outcome)

        try:
            self._token.run_sync_soon(trio.lowlevel.spawn_system_task, run)
        except trio.RunFinishedError:
            raise ModelNotReady("the server is stopping") from None
        try:
            ok, value = await future
        except asyncio.CancelledError:
            try:
                self._token.run_sync_soon(call.cancel)
            except trio.RunFinishedError:
                pass
            raise
        if ok:
            return value  # type: ignore[no-any-return]
        raise value
