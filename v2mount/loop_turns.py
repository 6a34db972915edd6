"""A share of each event-loop turn for predicts that run on the loop.

An event loop runs every task that is ready, then polls the sockets once. Inline
predicts (see ``runner._InlinePolicy``) hold the loop while they run, so with 64
requests in flight one turn lasts 64 predicts, and everything that happens at a poll
waits for it. uvloop (libuv ≥ 1.45) accepts one new connection per poll: 64 clients
connecting to a busy server were accepted one turn apiece, and the last one's first
request waited ≈ 0.5 s where every other waited 20 ms.

``LoopTurns`` lets inline predicts spend about ``budget`` seconds of a turn. Past it,
a request waits in line (first come, first served) and the next turns start as many
of the waiting as fit the budget (at least one), so a turn stays short and sockets are
polled between them, at the cost of one wake-up per request that waited.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Protocol, Union

import anyio

if TYPE_CHECKING:
    import trio

__all__ = ["LoopTurns"]

#: The event loop requests run on: asyncio's, or trio's token for its run.
Loop = Union[asyncio.AbstractEventLoop, "trio.lowlevel.TrioToken"]


class _Waiter(Protocol):
    def set(self) -> None: ...
    async def wait(self) -> None: ...


class _FutureWaiter:
    """An asyncio future as a one-shot event: a fraction of ``anyio.Event``'s cost."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # a cancelled waiter's future is done
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


class LoopTurns:
    """Bounds the inline predict time of one model in each event-loop turn."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._spent = 0.0
        self._average = budget
        self._turn_marked = False
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._loop: Loop | None = None

    @property
    def free(self) -> bool:
        """Whether a predict may run now: nobody waits and the turn has budget left."""
        self._follow_loop()
        return not self._waiting and self._spent < self.budget

    def _follow_loop(self) -> Loop:
        """The running loop; on another one than the last, start afresh (one loop at a
        time, as the runner: a loop that closed may have left a turn's callback unrun)."""
        loop = _running_loop()
        if loop is not self._loop:
            self._loop, self._spent, self._turn_marked = loop, 0.0, False
            self._waiting.clear()
        return loop

    def spend(self, seconds: float) -> None:
        """Record an inline predict that took ``seconds``. The count restarts at the
        turn after the one where it reached the budget (so under light load, where a
        turn holds one predict, that takes a callback every few predicts, not each)."""
        self._follow_loop()
        self._spent += seconds
        self._average = 0.9 * self._average + 0.1 * seconds
        if self._spent >= self.budget:
            self._mark_turn()

    async def wait(self) -> None:
        """Wait in line for a turn with budget for this request."""
        loop = self._follow_loop()
        waiter = (
            _FutureWaiter(loop) if isinstance(loop, asyncio.AbstractEventLoop) else anyio.Event()
        )
        self._waiting.append(waiter)
        self._mark_turn()
        try:
            await waiter.wait()
        except BaseException:
            try:
                self._waiting.remove(waiter)
            except ValueError:  # a turn had started it: its place goes to the one behind
                with contextlib.suppress(RuntimeError):  # unless its loop is gone
                    self._mark_turn()
            raise

    def _mark_turn(self) -> None:
        """Have ``_new_turn`` run once the loop has polled its sockets again."""
        if not self._turn_marked:
            self._turn_marked = True
            loop = self._loop
            if isinstance(loop, asyncio.AbstractEventLoop):
                loop.call_soon(self._new_turn)
            elif loop is not None:
                loop.run_sync_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._turn_marked = False
        self._spent = 0.0
        places = max(1, int(self.budget / self._average)) if self._average > 0 else 1
        for _ in range(min(places, len(self._waiting))):
            self._waiting.popleft().set()
        if self._waiting:
            # The started ones may all have been cancelled: the turn after starts more.
            self._mark_turn()


def _running_loop() -> Loop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop: trio
        import trio

        return trio.lowlevel.current_trio_token()
