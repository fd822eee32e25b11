"""HTTP server metrics, recorded by ``PoolwatchMiddleware``: request duration, requests in flight.

Hand-written rather than OpenTelemetry's ASGI metrics (one SDK ``Histogram.record`` with
attributes costs ~6 µs here) or prometheus_client's ``.labels().observe()`` (~1.5 µs): a request
costs a dict lookup for its pre-bound :class:`Histogram` per (method, route, status) and one
``deque.append``, with no lock. Route labels are the framework's matched route template
(Starlette and FastAPI put the route in the scope while routing), so a scan of random paths
never makes a new series: every unmatched request shares ``http.route="_UNMATCHED"``, and routes
past ``max_routes`` share ``_OTHER``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..log import errors
from ..metrics import FOLD_AT, HTTP_SERVER_ACTIVE, HTTP_SERVER_DURATION, Histogram, Point
from ..patching import Undo

if TYPE_CHECKING:
    from ..agent import Agent

PROBE = "asgi"
METHOD, ROUTE, STATUS = "http.request.method", "http.route", "http.response.status_code"
# semconv: known methods are kept, anything else is "_OTHER" (a scanner's method is no label).
METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
OTHER = "_OTHER"
UNMATCHED = "_UNMATCHED"

stats: HttpServerStats | None = None  # set while instrumented with http_server_metrics on


class HttpServerStats:
    """The HTTP series of one process; a registry source read at collect time."""

    probe = PROBE

    def __init__(self, max_routes: int) -> None:
        self.max_routes = max_routes
        self.durations: dict[tuple[str, str, int], Histogram] = {}
        # Requests in flight per method: list append/pop are atomic, so this stays exact even
        # if several event loops (threads) serve requests, and len() is the gauge.
        self.active: dict[str, list[None]] = {m: [] for m in (*METHODS, OTHER)}
        self._routes: dict[tuple[int, str], tuple[Any, str]] = {}  # (id(route), prefix) -> label
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.on_route: Any = None  # tracing mode: names the server span after the route

    # --- hot path ---------------------------------------------------------------------------
    async def serve(self, app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method = scope["method"]
        if method not in METHODS:
            method = OTHER
        active = self.active[method]
        active.append(None)
        root = scope.get("root_path", "")
        status = 0

        def send_status(message: dict[str, Any]) -> Any:  # returns send's awaitable: no frame
            if message["type"] == "http.response.start":
                nonlocal status
                status = message["status"]
            return send(message)

        if self.on_route is not None:  # tracing mode (its own closure: fewer cells here)
            send_status = self._naming(send_status, method, scope, root)
        start = perf_counter()
        try:
            await app(scope, receive, send_status)
        except Exception:
            status = status or 500  # what the server answers when the app raised before
            raise
        finally:
            took = perf_counter() - start
            active.pop()
            if status:  # 0: cancelled before any response, there is nothing to time
                try:
                    key = (method, self.route_label(scope, root), status)
                    histogram = self.durations.get(key) or self._new_series(key)
                    values = histogram.new  # Histogram.observe, inlined
                    values.append(took)
                    if len(values) >= FOLD_AT:
                        histogram.fold()
                except Exception as exc:
                    errors.record(PROBE, exc)

    def route_label(self, scope: dict[str, Any], root: str) -> str:
        route, after = scope.get("route"), scope.get("root_path", "")
        prefix = "" if after is root else after[len(root) :]  # a Mount's path
        if route is None and not prefix:
            return UNMATCHED
        hit = self._routes.get((id(route), prefix))
        return hit[1] if hit is not None else self._new_route(route, prefix)

    def _naming(self, send: Any, method: str, scope: dict[str, Any], root: str) -> Any:
        """``send`` that names the server span after the route when the response starts:
        routing is done by then, and the span is still open."""
        on_route = self.on_route

        def send_naming(message: dict[str, Any]) -> Any:
            if message["type"] == "http.response.start":
                try:
                    label = self.route_label(scope, root)
                    if label.startswith("/"):
                        on_route(method, label)
                except Exception as exc:
                    errors.record(PROBE, exc)
            return send(message)

        return send_naming

    # --- rare: first request of a series or a route -----------------------------------------
    def _new_series(self, key: tuple[str, str, int]) -> Histogram:
        with self._lock:
            return self.durations.setdefault(key, Histogram())

    def _new_route(self, route: Any, prefix: str) -> str:
        if route is None:  # a mounted app that is no router (static files, WSGI...)
            template: Any = "/{path}"
        else:
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            if not isinstance(template, str):
                return UNMATCHED
            if type(route).__name__ == "Mount" and prefix.endswith(route.path):
                # The route is the Mount itself (Starlette): root_path already holds the mount's
                # path, and its template ends with "/{path}".
                prefix = prefix[: len(prefix) - len(route.path)]
        template = prefix.rstrip("/") + template
        with self._lock:
            if template not in self._labels and len(self._labels) >= self.max_routes:
                template = OTHER
            else:
                self._labels.add(template)
            # Mount paths with parameters make one prefix per value: cache a bounded number
            # (the labels stay bounded either way). The route is kept so its id stays its own.
            if len(self._routes) < 4 * self.max_routes:
                self._routes[(id(route), prefix)] = (route, template)
        return template

    # --- collect time -----------------------------------------------------------------------
    def alive(self) -> bool:
        return True

    def points(self) -> Iterator[Point]:
        durations = self.durations.copy()  # one C call: atomic against new series
        for (method, route, status), histogram in durations.items():
            attributes = {METHOD: method, ROUTE: route, STATUS: str(status)}
            yield Point(HTTP_SERVER_DURATION, attributes, histogram.value())
        seen = {method for method, _, _ in durations}
        for method, inflight in self.active.items():
            if inflight or method in seen:
                yield Point(HTTP_SERVER_ACTIVE, {METHOD: method}, len(inflight))


def install(agent: Agent) -> list[Undo]:
    global stats
    settings = agent.settings
    if settings is None or not settings.http_server_metrics:
        return []
    stats = HttpServerStats(settings.max_routes)
    agent.registry.add(stats)

    def undo() -> None:
        global stats
        stats = None

    return [undo]
