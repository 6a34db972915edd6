"""The smoothed arrival rate: how long until the next request, and how many rows it brings."""

from __future__ import annotations

import math

__all__ = ["ArrivalRate"]


class ArrivalRate:
    """Exponentially weighted means of the gap between arrivals and of rows per request.

    ``gap(now)`` is the expected wait for the next request: the smoothed gap, or the
    silence since the last arrival when that is longer (traffic that stopped is not
    expected back at its old rate). Before two arrivals it is infinite: nothing is
    expected. ``weight`` is the share of the newest sample (1/16: about the last 16
    arrivals count). Not thread-safe; times are in the caller's clock.
    """

    def __init__(self, weight: float = 1 / 16) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], not {weight}")
        self._weight = weight
        self._last: float | None = None
        self._gap = math.inf
        self._rows = 1.0

    def arrive(self, now: float, rows: int) -> None:
        if self._last is not None:
            gap = max(0.0, now - self._last)
            self._gap = (
                gap if math.isinf(self._gap) else self._gap + self._weight * (gap - self._gap)
            )
            self._rows += self._weight * (rows - self._rows)
        else:
            self._rows = float(rows)
        self._last = now

    def gap(self, now: float) -> float:
        if self._last is None:
            return math.inf
        return max(self._gap, now - self._last)

    def quiet_from(self, gap: float) -> float:
        """The first moment ``t`` at which ``gap(t) >= gap`` (``-inf``: already so).

        The expected gap grows with the silence since the last arrival.
        """
        if self._last is None or self._gap >= gap:
            return -math.inf
        return self._last + gap

    def last_moment(self, limit: float) -> float:
        """The latest ``t`` with ``t + gap(t) <= limit``: from then on, waiting for the
        next request is expected to take past ``limit`` (``-inf``: nothing expected)."""
        if self._last is None or math.isinf(self._gap):
            return -math.inf
        if limit - self._gap <= self._last + self._gap:
            return limit - self._gap
        return (limit + self._last) / 2

    @property
    def rows(self) -> float:
        """Smoothed rows per request."""
        return self._rows
