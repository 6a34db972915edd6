"""The batch cost model ``L(b) = a + c·b``, fitted online from the batches that ran."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

__all__ = ["CostFit", "CostModel"]


@dataclass(frozen=True, slots=True)
class CostFit:
    """A fitted cost: ``intercept + per_row·rows`` seconds, plus ``guard`` seconds of margin.

    ``guard`` is the 95th percentile of the residuals (how much slower than the line a
    batch ran), never negative, and at most three standard deviations (estimated from
    the median absolute deviation) above the median residual: when more than 5 % of the
    batches stall — a process descheduled on a busy host — the stalls are left out, as
    no batch size or admission could avoid them (they show as SLO misses). ``samples``
    counts the batches the fit saw.
    """

    intercept: float
    per_row: float
    guard: float
    samples: int
    #: The smallest batch size the line rests on: below it the cost is taken as flat.
    min_rows: float = 1.0

    def cost(self, rows: float) -> float:
        """Seconds for a batch of ``rows``; below ``min_rows`` as much as ``min_rows``
        (a batch costs no less than a smaller one, and the line was not seen there)."""
        return self.intercept + self.per_row * max(rows, self.min_rows)


class CostModel:
    """A robust line through recent (rows, seconds) samples; not thread-safe.

    The window slides per *size class* (1, 2-3, 4-7, 8-15 … rows): each class keeps its
    last ``window`` batches. Under steady load nearly every batch has the same size, and a
    window of those alone cannot show how the cost grows with the rows; the classes keep
    the smaller batches seen earlier (a class that stops being used keeps its last
    batches: if the model's cost drifts, its old figures stay in the fit). The line goes
    through the medians of the classes holding ``MIN_CLASS_SAMPLES`` batches or more (so
    a batch slowed by a garbage collection or a busy core moves it little), with
    Theil-Sen's slope — the median of the pairwise slopes, weighted by their spread in
    rows — and the median intercept. Below the smallest size the line rests on, the cost
    is taken as flat (under steady overload only full batches are seen, and the line's
    intercept is a guess). With a single class the slope cannot be seen and the cost is
    taken as proportional to the rows above that size, flat below. Both terms are kept
    non-negative. ``fit()`` is ``None`` until
    ``min_samples`` batches were recorded: callers then do not wait at all.
    """

    REFIT = 4
    #: A size class with fewer batches does not place the line (one stalled batch would).
    MIN_CLASS_SAMPLES = 3
    #: The guard is capped this many (normal-scaled) median absolute deviations above
    #: the median residual: rare stalls are not the model's cost.
    STALL_MADS = 3.0

    def __init__(self, window: int = 16, min_samples: int = 8, quantile: float = 0.95) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError(
                f"window and min_samples must be positive, not {window}, {min_samples}"
            )
        self._window = window
        self._classes: dict[int, deque[tuple[float, float]]] = {}
        self._min_samples = min_samples
        self._quantile = quantile
        self._count = 0
        self._fit: CostFit | None = None
        self._fresh = 0  # samples since the last fit

    def record(self, rows: int, seconds: float) -> None:
        samples = self._classes.get(rows.bit_length())
        if samples is None:
            samples = self._classes[rows.bit_length()] = deque(maxlen=self._window)
        samples.append((float(rows), max(0.0, seconds)))
        self._count += 1
        self._fresh += 1

    def fit(self) -> CostFit | None:
        """The current fit, or ``None`` while cold.

        Recomputed lazily, once ``REFIT`` samples came in since the last fit (a fit costs
        tens of µs: not worth paying after every batch of a fast model).
        """
        if self._count >= self._min_samples and (
            self._fresh >= self.REFIT or (self._fit is None and self._fresh)
        ):
            self._fresh = 0
            self._fit = self._compute()
        return self._fit

    def _compute(self) -> CostFit:
        # Pure Python: a few dozen numbers, where numpy's per-call cost would dominate.
        classes = [s for s in self._classes.values() if len(s) >= self.MIN_CLASS_SAMPLES]
        points = [
            (statistics.median(x for x, _ in samples), statistics.median(y for _, y in samples))
            for samples in classes or self._classes.values()
        ]
        if len(points) > 1:
            slopes = [
                ((y1 - y0) / (x1 - x0), abs(x1 - x0))
                for index, (x0, y0) in enumerate(points)
                for x1, y1 in points[index + 1 :]
            ]
            slope = max(_weighted_median(slopes), 0.0)
            intercept = max(statistics.median(y - slope * x for x, y in points), 0.0)
        else:  # one size class only: proportional
            (x, y), intercept = points[0], 0.0
            slope = y / x
        residuals = sorted(
            y - intercept - slope * x for samples in self._classes.values() for x, y in samples
        )
        p95 = residuals[min(len(residuals) - 1, int(self._quantile * len(residuals)))]
        middle = statistics.median(residuals)
        spread = statistics.median(abs(r - middle) for r in residuals)
        guard = max(min(p95, middle + self.STALL_MADS * 1.4826 * spread), 0.0)
        return CostFit(intercept, slope, guard, self._count, min(x for x, _ in points))


def _weighted_median(pairs: list[tuple[float, float]]) -> float:
    """The value at half the total weight of ``(value, weight)`` pairs."""
    pairs.sort()
    half = sum(weight for _, weight in pairs) / 2
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= half:
            return value
    return pairs[-1][0]
