"""Custom metrics a model records from ``load``/``predict``, wherever it runs.

A model calls ``self.metrics.counter(...)``, ``.gauge(...)`` or ``.histogram(...)``. The
calls are only recorded here, as plain picklable ``MetricUpdate`` tuples; whoever ran
the model (the main process directly, or a worker in its reply) drains them and the
app's metrics registry applies them. So a worker process needs no prometheus state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

__all__ = ["CustomMetrics", "MetricUpdate"]

Kind = Literal["counter", "gauge", "histogram"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class MetricUpdate(NamedTuple):
    kind: Kind
    name: str
    documentation: str
    labels: tuple[tuple[str, str], ...]
    value: float
    buckets: tuple[float, ...] | None = None


class CustomMetrics:
    """Records metric updates from model code; never touches prometheus itself.

    Names are checked here, so a typo raises ``ValueError`` in the model's own code
    (in its worker process too) instead of a warning in the server's log. A name first
    used as one kind with one set of label names keeps them: a later conflicting update
    is dropped with a warning when the app applies it. Not thread-safe: a model records
    from the thread that runs its ``load``/``predict``.
    """

    def __init__(self) -> None:
        self._updates: list[MetricUpdate] = []

    def _record(
        self,
        kind: Kind,
        name: str,
        value: float,
        documentation: str,
        labels: Mapping[str, str] | None,
        buckets: Sequence[float] | None = None,
    ) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        label_items = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        for label, _ in label_items:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for metric {name!r}")
        self._updates.append(
            MetricUpdate(
                kind,
                name,
                documentation,
                label_items,
                float(value),
                tuple(buckets) if buckets is not None else None,
            )
        )

    def counter(
        self,
        name: str,
        amount: float = 1.0,
        documentation: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Add ``amount`` (≥ 0) to counter ``name``."""
        if amount < 0:
            raise ValueError("a counter can only go up")
        self._record("counter", name, amount, documentation, labels)

    def gauge(
        self,
        name: str,
        value: float,
        documentation: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Set gauge ``name`` to ``value``."""
        self._record("gauge", name, value, documentation, labels)

    def histogram(
        self,
        name: str,
        value: float,
        documentation: str = "",
        labels: Mapping[str, str] | None = None,
        buckets: Sequence[float] | None = None,
    ) -> None:
        """Observe ``value`` in histogram ``name`` (``buckets`` fixed at first use)."""
        self._record("histogram", name, value, documentation, labels, buckets)

    def drain(self) -> list[MetricUpdate]:
        """Take every update recorded so far (called by whoever ran the model)."""
        updates, self._updates = self._updates, []
        return updates
