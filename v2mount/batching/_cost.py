"""The batch cost model ``L(b) = a + c·b``, fitted online from the batches that ran."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["CostFit", "CostModel"]


@dataclass(frozen=True, slots=True)
class CostFit:
    """A fitted cost: ``intercept + per_row·rows`` seconds, plus ``guard`` seconds of margin.

    ``guard`` is the 95th percentile of the residuals (how much slower than the line a
    batch ran), never negative. ``samples`` counts the batches the fit saw.
    """

    intercept: float
    per_row: float
    guard: float
    samples: int

    def cost(self, rows: float) -> float:
        return self.intercept + self.per_row * rows


class CostModel:
    """A robust line through recent (rows, seconds) samples; not thread-safe.

    The window slides per *size class* (1, 2-3, 4-7, 8-15 … rows): each class keeps its
    last ``window`` batches. Under steady load nearly every batch has the same size, and a
    window of those alone cannot show how the cost grows with the rows; the classes keep
    the smaller batches seen earlier. The line goes through the classes' medians (so a
    batch slowed by a garbage collection or a busy core moves it little), with Theil-Sen's
    slope — the median of the pairwise slopes, weighted by their spread in rows — and the
    median intercept. With a single class the slope cannot be seen and the cost is taken
    as proportional to the rows, which overestimates larger batches, never
    underestimates. Both terms are kept non-negative. ``fit()`` is ``None`` until
    ``min_samples`` batches were recorded: callers then do not wait at all.
    """

    def __init__(self, window: int = 16, min_samples: int = 8, quantile: float = 0.95) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError(
                f"window and min_samples must be positive, not {window}, {min_samples}"
            )
        self._window = window
        self._classes: dict[int, deque[tuple[float, float]]] = {}
        self._min_samples = min_samples
        self._quantile = quantile * 100
        self._count = 0
        self._fit: CostFit | None = None
        self._stale = False

    def record(self, rows: int, seconds: float) -> None:
        samples = self._classes.get(rows.bit_length())
        if samples is None:
            samples = self._classes[rows.bit_length()] = deque(maxlen=self._window)
        samples.append((float(rows), max(0.0, seconds)))
        self._count += 1
        self._stale = True

    def fit(self) -> CostFit | None:
        """The current fit (recomputed lazily after new samples), or ``None`` while cold."""
        if self._stale and self._count >= self._min_samples:
            self._stale = False
            self._fit = self._compute()
        return self._fit

    def _compute(self) -> CostFit:
        medians = np.array(
            [np.median(np.asarray(samples), axis=0) for samples in self._classes.values()]
        )
        x, y = medians[:, 0], medians[:, 1]
        if len(x) > 1:
            dx = x[:, None] - x[None, :]
            upper = np.triu(np.ones_like(dx, dtype=bool), 1)
            slopes = ((y[:, None] - y[None, :]) / np.where(dx == 0, 1, dx))[upper]
            slope = max(_weighted_median(slopes, np.abs(dx[upper])), 0.0)
            intercept = max(float(np.median(y - slope * x)), 0.0)
        else:  # one size class only: proportional
            slope, intercept = float(y[0] / x[0]), 0.0
        everything = np.array([sample for samples in self._classes.values() for sample in samples])
        residuals = everything[:, 1] - (intercept + slope * everything[:, 0])
        guard = max(float(np.percentile(residuals, self._quantile)), 0.0)
        return CostFit(intercept, slope, guard, self._count)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
