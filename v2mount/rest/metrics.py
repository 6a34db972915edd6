"""``/metrics`` and the REST metrics middleware (count, latency, in progress per route).

Requests are labelled by the *template* of the route that serves them
(``/v2/models/{name}/infer``), never by the raw path, so model names in URLs cannot
explode the label set. A path no route matches is labelled ``<unmatched>``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2mount.errors import SettingsError
from v2mount.metrics.app import AppMetrics
from v2mount.metrics.exposition import metrics_endpoint
from v2mount.metrics.tally import CounterChild, GaugeChild, HistogramChild
from v2mount.rest.scope import route_path

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["RestMetricsMiddleware", "RouteMetrics", "metrics_routes"]

#: The ``path`` label of a request that no route matched.
UNMATCHED = "<unmatched>"

_GROUP = re.compile(r"\(\?P<\w+>")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def metrics_routes(app: V2App) -> list[BaseRoute]:
    """``GET {settings.metrics_path}``; nothing when the path is ``None`` or empty (the
    way to turn it off from the environment: ``V2MOUNT_METRICS_PATH=``)."""
    path = app.settings.metrics_path
    if not path:
        return []
    if not path.startswith("/"):
        raise SettingsError(f"metrics_path {path!r} must start with '/'")
    return [Route(path, metrics_endpoint(app.metrics), methods=["GET"], name="metrics")]


class RouteMetrics:
    """The REST metric children of one method and route template, resolved once.

    Label look-ups build a key (and take a lock in prometheus-client); holding the
    children here makes a request's accounting two attribute reads and one dict lookup
    (statuses are a small set).
    """

    __slots__ = ("_answered", "_labels", "_metrics", "in_progress")

    def __init__(self, metrics: AppMetrics, method: str, path: str) -> None:
        self._metrics = metrics
        self._labels = (method, path)
        self.in_progress: Gauge | GaugeChild = metrics.rest_in_progress.labels(method, path)
        self._answered: dict[int, tuple[Counter | CounterChild, Histogram | HistogramChild]] = {}

    def answered(self, status: int, seconds: float) -> None:
        """Count one request answered with ``status`` after ``seconds``."""
        children = self._answered.get(status)
        if children is None:
            labels = (*self._labels, str(status))
            children = (
                self._metrics.rest_requests.labels(*labels),
                self._metrics.rest_duration.labels(*labels),
            )
            self._answered[status] = children
        children[0].inc()
        children[1].observe(seconds)


class RestMetricsMiddleware:
    """Pure ASGI middleware counting and timing every HTTP request of ``app``.

    ``routes`` are the routes ``app`` dispatches to (in order); the first that fully
    matches names the request, else the first that matches the path with another
    method (Starlette answers 405), else ``<unmatched>``. The status is the one sent in
    ``http.response.start``, or 500 when the app raised before sending any; a cancelled
    request (client gone) is still counted and timed, with the status sent so far.
    Methods outside the standard ones are labelled ``OTHER``. Other scope types pass
    through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: AppMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = list(routes)
        # One regex for all routes (one match per request, not one per route): each
        # route's own regex, its named groups made anonymous, wrapped in a group r<i>.
        self._plain = all(isinstance(route, Route) for route in self.routes)
        # Children by method and template (a bounded set), so a request skips
        # prometheus-client's label lookup and its lock.
        self._children: dict[tuple[str, str], RouteMetrics] = {}
        self._regex = re.compile(
            "|".join(
                f"(?P<r{i}>{_GROUP.sub('(?:', route.path_regex.pattern)})"
                for i, route in enumerate(self.routes)
                if isinstance(route, Route)
            )
        )

    def template(self, scope: Scope) -> str:
        """The template of the route that answers ``scope``, or ``<unmatched>``."""
        if not self._plain or not self.routes:
            return self._scan(scope)
        match = self._regex.match(route_path(scope))
        if match is None or match.lastgroup is None:
            return UNMATCHED
        route = self.routes[int(match.lastgroup[1:])]
        assert isinstance(route, Route)
        if route.methods is None or scope["method"] in route.methods:
            return route.path
        return self._scan(scope)  # a 405 here, or the same path with another method later

    def _scan(self, scope: Scope) -> str:
        partial: str | None = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", UNMATCHED)
            if match is Match.PARTIAL and partial is None:
                partial = getattr(route, "path", UNMATCHED)
        return partial if partial is not None else UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"] if scope["method"] in _METHODS else "OTHER"
        path = self.template(scope)
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        children = self._children.get((method, path))
        if children is None:
            children = self._children[(method, path)] = RouteMetrics(self.metrics, method, path)
        children.in_progress.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            children.in_progress.dec()
            children.answered(status, elapsed)
