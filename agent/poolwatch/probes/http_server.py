"""HTTP server metrics, recorded by ``PoolwatchMiddleware``: request duration, requests in flight.

Hand-written rather than OpenTelemetry's ASGI metrics (one SDK ``Histogram.record`` with
attributes costs ~6 µs here) or prometheus_client's ``.labels().observe()`` (~1.5 µs): a request
costs a dict lookup for its pre-bound :class:`Histogram` per (method, route, status) and one
``deque.append``, with no lock. Route labels are the matched route's template, so a scan of
random paths never makes a new series: every unmatched request shares ``http.route="_UNMATCHED"``,
and routes past ``max_routes`` share ``_OTHER``.

Templates come from ``poolwatch.context.route_template``: a dict lookup per request.

The app's own Prometheus endpoint (prometheus_client's ``make_asgi_app``,
prometheus-fastapi-instrumentator, starlette-exporter...) is left out: a series whose first
response is a Prometheus or OpenMetrics exposition (its content type) is not exported. See
docs/probes.md for why the content type and not the path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from .._histogram import FOLD_AT, Histogram
from .._log import errors
from .._types import Hooks, Host, Stop
from ..context import route_indexes, route_template
from ..metrics import (
    HTTP_METHODS,
    HTTP_OTHER_METHOD,
    HTTP_SERVER_ACTIVE,
    HTTP_SERVER_DURATION,
    Point,
)

PROBE = "asgi"
METHOD, ROUTE, STATUS = "http.request.method", "http.route", "http.response.status_code"
METHODS = HTTP_METHODS
OTHER = HTTP_OTHER_METHOD  # also the route label past max_routes
UNMATCHED = "_UNMATCHED"
# Not called through the imported name: CPython compiles ``imported_name.get(...)`` as an
# attribute load (a bound method made per request), a plain global's as a method call.
_indexes = route_indexes


class HttpServerStats:
    """The HTTP series of one process; a registry source read at collect time."""

    probe = PROBE

    def __init__(self, max_routes: int) -> None:
        self.max_routes = max_routes
        self.durations: dict[tuple[str, str, int], Histogram] = {}
        # Requests in flight per method: list append/pop are atomic, so this stays exact even
        # if several event loops (threads) serve requests, and len() is the gauge.
        self.active: dict[str, list[None]] = {m: [] for m in (*METHODS, OTHER)}
        self._labels: set[str] = set()
        self._scrapes = Histogram()  # the series of the app's own /metrics: never exported
        self._lock = threading.Lock()
        self.on_route: Callable[[str, str], None] | None = None  # tracing mode: names the span

    # --- hot path ---------------------------------------------------------------------------
    async def serve(self, app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method = scope["method"]
        if method not in METHODS:
            method = OTHER
        active = self.active[method]
        active.append(None)
        response: dict[str, Any] | None = None  # the http.response.start message

        def send_status(message: dict[str, Any]) -> Any:  # returns send's awaitable: no frame
            if message["type"] == "http.response.start":
                nonlocal response
                response = message
            return send(message)

        if self.on_route is not None:  # tracing mode (its own closure: fewer cells here)
            send_status = self._naming(send_status, method, scope)
        start = perf_counter()
        failed = False
        try:
            await app(scope, receive, send_status)
        except Exception:
            failed = True
            raise
        finally:
            took = perf_counter() - start
            active.pop()
            if response is not None or failed:  # cancelled before any response: nothing to time
                try:
                    # 500: what the server answers when the app raised before responding
                    status = response["status"] if response is not None else 500
                    key = (method, self.route_label(scope), status)
                    histogram = self.durations.get(key) or self._new_series(key, response)
                    values = histogram.new  # Histogram.observe, inlined
                    values.append(took)
                    if len(values) >= FOLD_AT:
                        histogram.fold()
                except Exception as exc:
                    errors.record(PROBE, exc)

    def requests_by_route(self) -> dict[str, int]:
        return requests_by_route(self)

    def route_label(self, scope: dict[str, Any]) -> str:
        # route_template's common case, inlined: three dict lookups and a set lookup
        index = _indexes.get(id(scope.get("router")))
        if index is not None:
            template = index.templates.get(id(scope.get("route") or scope.get("endpoint")))
            if template.__class__ is str and template in self._labels:
                return template
        template = route_template(scope)
        if template is None:
            return UNMATCHED
        return template if template in self._labels else self._new_label(template)

    def _naming(self, send: Any, method: str, scope: dict[str, Any]) -> Any:
        """``send`` that names the server span after the route when the response starts:
        routing is done by then, and the span is still open."""
        on_route = self.on_route
        assert on_route is not None  # only called in tracing mode

        def send_naming(message: dict[str, Any]) -> Any:
            if message["type"] == "http.response.start":
                try:
                    label = self.route_label(scope)
                    if label.startswith("/"):
                        on_route(method, label)
                except Exception as exc:
                    errors.record(PROBE, exc)
            return send(message)

        return send_naming

    # --- rare: first request of a series or a route -----------------------------------------
    def _new_series(self, key: tuple[str, str, int], response: dict[str, Any] | None) -> Histogram:
        # A route's first response tells whether it is the app's Prometheus endpoint: its
        # scrapes are the monitoring system's traffic, not the app's.
        route = key[1]
        scrape = route not in (UNMATCHED, OTHER) and _is_exposition(response)
        histogram = self._scrapes if scrape else Histogram()
        with self._lock:
            return self.durations.setdefault(key, histogram)

    def _new_label(self, template: str) -> str:
        with self._lock:
            if template not in self._labels and len(self._labels) >= self.max_routes:
                return OTHER
            self._labels.add(template)
        return template

    # --- collect time -----------------------------------------------------------------------
    def alive(self) -> bool:
        return True

    def points(self) -> Iterator[Point]:
        durations = self.durations.copy()  # one C call: atomic against new series
        for (method, route, status), histogram in durations.items():
            if histogram is self._scrapes:
                continue
            attributes = {METHOD: method, ROUTE: route, STATUS: str(status)}
            yield Point(HTTP_SERVER_DURATION, attributes, histogram.value())
        seen = {key[0] for key, histogram in durations.items() if histogram is not self._scrapes}
        for method, inflight in self.active.items():
            if inflight or method in seen:
                yield Point(HTTP_SERVER_ACTIVE, {METHOD: method}, len(inflight))


def requests_by_route(stats: HttpServerStats) -> dict[str, int]:
    """Requests answered so far per ``http.route`` label (the app's own /metrics left out)."""
    out: dict[str, int] = {}
    for (_, route, _), histogram in stats.durations.copy().items():
        if histogram is not stats._scrapes:
            out[route] = out.get(route, 0) + histogram.value().count
    return out


def _is_exposition(response: dict[str, Any] | None) -> bool:
    """A Prometheus text (``text/plain; version=0.0.4``) or OpenMetrics response?"""
    for name, value in (response or {}).get("headers") or ():
        if bytes(name).lower() == b"content-type":
            value = bytes(value).lower()
            return value.startswith(b"application/openmetrics-text") or (
                value.startswith(b"text/plain") and b"version=" in value
            )
    return False


# --- the probe contract (probes/__init__.py) ------------------------------------------------
WATCHES = (
    None  # no objects: requests come through PoolwatchMiddleware, which reads agent.http_server
)


def install(agent: Host, hooks: Hooks) -> None:
    """The recorder of this process's requests, handed to the middleware through the agent."""
    settings = agent.settings
    if settings is None or not settings.http_server_metrics:
        return
    stats = HttpServerStats(settings.max_routes)
    agent.http_server = stats
    agent.registry.add(stats)

    def undo() -> None:
        if agent.http_server is stats:
            agent.http_server = None

    hooks.on_undo(undo)


def existing(agent: Host, obj: object) -> None:
    return None


def watch(agent: Host, obj: object, name: str | None = None) -> None:
    raise TypeError("the http_server probe watches no objects: instrument(app) serves it")


def start(agent: Host) -> Stop | None:
    return None
