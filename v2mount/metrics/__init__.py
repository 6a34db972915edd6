"""Prometheus metrics: one registry per app, seed names, custom metrics from models.

``AppMetrics`` holds an app's metrics (``v2app.metrics``); ``CustomMetrics`` is what a
model records into (``self.metrics`` in ``load``/``predict``); ``metrics_endpoint``
serves an app's metrics on a host's own route.
"""

from __future__ import annotations

from v2mount.metrics.app import AppMetrics
from v2mount.metrics.custom import CustomMetrics, MetricUpdate
from v2mount.metrics.exposition import metrics_endpoint, render
from v2mount.metrics.queues import QueueCollector, QueueSource

__all__ = [
    "AppMetrics",
    "CustomMetrics",
    "MetricUpdate",
    "QueueCollector",
    "QueueSource",
    "metrics_endpoint",
    "render",
]
