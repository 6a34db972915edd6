"""Rendering an app's metrics for Prometheus, and an endpoint a host can route to.

``metrics_endpoint(v2app)`` is a Starlette endpoint: ``Route("/metrics",
metrics_endpoint(v2app))`` in a host serves the app's metrics on the host's own route
(set ``metrics_path=None`` on the app to drop its own). It honours ``Accept``
(Prometheus text or OpenMetrics), ``Accept-Encoding: gzip`` and multiprocess mode.
"""

from __future__ import annotations

import gzip
from collections.abc import Awaitable, Callable
from typing import Protocol

from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response

from v2mount.metrics.app import AppMetrics

__all__ = ["metrics_endpoint", "render"]

#: Below this many bytes a gzip answer is not worth the CPU.
_GZIP_MIN_BYTES = 1024


class _HasMetrics(Protocol):
    @property
    def metrics(self) -> AppMetrics: ...


def render(
    metrics: AppMetrics, accept: str = "", accept_encoding: str = ""
) -> tuple[bytes, dict[str, str]]:
    """The scrape body and its headers, in the format ``accept`` asks for.

    Runs the collectors in the calling thread (the queue gauges read model state, so
    call it on the event loop that serves the models).
    """
    encoder, content_type = choose_encoder(accept)
    body = encoder(metrics.exposition_registry())
    headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
    wants_gzip = any(part.split(";")[0].strip() == "gzip" for part in accept_encoding.split(","))
    if wants_gzip and len(body) >= _GZIP_MIN_BYTES:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def metrics_endpoint(
    source: AppMetrics | _HasMetrics,
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving ``source``'s metrics (a ``V2App`` or its ``metrics``)."""
    metrics = source if isinstance(source, AppMetrics) else source.metrics

    async def endpoint(request: Request) -> Response:
        body, headers = render(
            metrics,
            request.headers.get("accept", ""),
            request.headers.get("accept-encoding", ""),
        )
        return Response(body, headers=headers)

    return endpoint
