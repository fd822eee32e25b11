"""HTTP server metrics, recorded by ``PoolwatchMiddleware``: request duration, requests in flight.

Hand-written rather than OpenTelemetry's ASGI metrics (one SDK ``Histogram.record`` with
attributes costs ~6 µs here) or prometheus_client's ``.labels().observe()`` (~1.5 µs): a request
costs a dict lookup for its pre-bound :class:`Histogram` per (method, route, status) and one
``deque.append``, with no lock. Route labels are the matched route's template, so a scan of
random paths never makes a new series: every unmatched request shares ``http.route="_UNMATCHED"``,
and routes past ``max_routes`` share ``_OTHER``.

Templates (:func:`route_template`): Starlette's router leaves ``endpoint`` and ``router`` in the
scope on every release, and ``route`` only on recent ones (and FastAPI's own routes). The
router's routes, through ``Mount`` and ``Host``, are walked once into a map from route and
endpoint to full template (``/api/{version}/users/{id}``); a request then costs a dict lookup,
and a path match only for an endpoint served under several templates.

The app's own Prometheus endpoint (prometheus_client's ``make_asgi_app``,
prometheus-fastapi-instrumentator, starlette-exporter...) is left out: a series whose first
response is a Prometheus or OpenMetrics exposition (its content type) is not exported. See
docs/probes.md for why the content type and not the path.
"""

from __future__ import annotations

import threading
import weakref
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


# --- route templates ------------------------------------------------------------------------------
class _Routes:
    """The full template of every route of one router (and of its mounted routers), keyed by
    ``id()`` of the route object and of its endpoint. The index lives as long as its router and
    holds no reference to what it names: the router holds its routes, so their ids stay theirs
    (an app built per test is freed with its router; only a route removed from a live router
    could leave a stale id behind)."""

    def __init__(self, router: Any) -> None:
        found: dict[int, list[tuple[str, str] | None]] = {}

        def add(key: Any, entry: tuple[str, str] | None) -> None:
            if key is not None:
                found.setdefault(id(key), []).append(entry)

        def walk(routes: Any, raw: str, fmt: str, depth: int) -> None:
            for route in list(routes or ()) if depth < 16 else ():
                sub = getattr(route, "routes", None)
                if hasattr(route, "host") and sub is not None:  # Host: no path of its own
                    walk(sub, raw, fmt, depth + 1)
                    # the last match, with routes inside: none of them matched
                    entry = None if sub else (fmt + "/{path}", raw + "/{path:path}")
                    add(route, entry)
                    add(getattr(route, "app", None), entry)
                    continue
                path, path_format = getattr(route, "path", None), getattr(route, "path_format", "")
                if not isinstance(path, str) or not isinstance(path_format, str):
                    continue
                if path_format.endswith("/{path}") and hasattr(route, "app") and sub is not None:
                    # a Mount: its routes under its path; a mounted app without routes (static
                    # files, WSGI...) is named by the mount's "/{path}" template
                    mount_fmt = path_format[: -len("/{path}")]
                    if sub:
                        walk(sub, raw + path, fmt + mount_fmt, depth + 1)
                        entry = None
                    else:
                        entry = (fmt + path_format, raw + path + "/{path:path}")
                    add(route, entry)
                    add(route.app, entry)
                    continue
                entry = (fmt + path_format, raw + path)
                add(route, entry)
                add(getattr(route, "endpoint", None), entry)

        walk(getattr(router, "routes", None), "", "", 0)
        self.templates: dict[int, Any] = {key: _resolve(v) for key, v in found.items()}
        self.missed: dict[int, str | None] = {}  # keys found in no route: their own template


def _resolve(entries: list[tuple[str, str] | None]) -> Any:
    """One template: it; none: None (unmatched); several (an endpoint or a route served at more
    than one path): the candidates, each with its regex, in routing order."""
    unique = list(dict.fromkeys(e for e in entries if e is not None))
    if not unique:
        return None
    if len({template for template, _ in unique}) == 1:
        return unique[0][0]
    from starlette.routing import compile_path  # only Starlette routers get here

    return tuple((compile_path(raw)[0], template) for template, raw in unique)


_indexes: dict[int, _Routes] = {}  # id(router) -> its routes; dropped when the router is
_MISSING = object()


def route_template(scope: dict[str, Any]) -> str | None:
    """The template of the route that answered ``scope`` (``/users/{id}``), never the raw path;
    None when nothing matched."""
    key = scope.get("route") or scope.get("endpoint")
    if key is None:
        return None
    router = scope.get("router")
    index = _indexes.get(id(router)) if router is not None else None
    found = index.templates.get(id(key), _MISSING) if index is not None else _MISSING
    if found.__class__ is str:
        return found  # type: ignore[no-any-return]
    if found is None:
        return None
    if found is _MISSING:
        found = _slow_lookup(router, key, scope)
        if found is None or found.__class__ is str:
            return found  # type: ignore[no-any-return]
    return _match(found, scope)


def _slow_lookup(router: Any, key: Any, scope: dict[str, Any]) -> Any:
    """First request of a router, or a route it does not list (added later, or made by the
    framework, like FastAPI's included routers): (re)index, else the route's own template."""
    index = _indexes.get(id(router)) if router is not None else None
    if router is None or (index is not None and len(index.missed) >= 100):
        return _own_template(key, scope)  # routes made per request: stop re-walking
    rid = id(router)
    if index is None:
        try:
            weakref.finalize(router, _indexes.pop, rid, None)
        except TypeError:  # a router without weak references: no index
            return _own_template(key, scope)
    fresh = _Routes(router)
    if index is not None:
        fresh.missed.update(index.missed)
        fresh.templates.update(index.missed)
    found = fresh.templates.get(id(key), _MISSING)
    if found is _MISSING:
        found = _own_template(key, scope)
        if scope.get("root_path", "") == scope.get("app_root_path", scope.get("root_path", "")):
            # Outside any Mount the template is the route's alone: remember it for as long as
            # the route lives (a weak reference: no id outlives its object here).
            try:
                weakref.finalize(key, _forget, rid, id(key))
                fresh.missed[id(key)] = fresh.templates[id(key)] = found
            except TypeError:
                pass
    _indexes[rid] = fresh
    return found


def _forget(rid: int, key: int) -> None:
    index = _indexes.get(rid)
    if index is not None:
        index.templates.pop(key, None)
        index.missed.pop(key, None)


def _own_template(route: Any, scope: dict[str, Any]) -> str | None:
    """A route no router lists: its own template, under the path of the Mount it is in."""
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return None
    root, after = scope.get("app_root_path"), scope.get("root_path", "")  # a Mount sets both
    prefix = after[len(root) :] if root is not None and after.startswith(root) else ""
    return prefix.rstrip("/") + template


def _match(candidates: tuple[tuple[Any, str], ...], scope: dict[str, Any]) -> str | None:
    """An endpoint served at several paths: the template whose path matches (routing order)."""
    path = scope.get("path", "")
    root = scope.get("app_root_path", scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    for regex, template in candidates:
        if regex.match(path):
            return template  # type: ignore[no-any-return]
    return candidates[0][1]


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
        self.on_route: Any = None  # tracing mode: names the server span after the route

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

    def route_label(self, scope: dict[str, Any]) -> str:
        # route_template's common case, inlined: three dict lookups and a set lookup
        index = _indexes.get(id(scope.get("router")))
        if index is not None:
            template = index.templates.get(id(scope.get("route") or scope.get("endpoint")))
            if template.__class__ is str and template in self._labels:
                return template  # type: ignore[no-any-return]
        template = route_template(scope)
        if template is None:
            return UNMATCHED
        return template if template in self._labels else self._new_label(template)

    def _naming(self, send: Any, method: str, scope: dict[str, Any]) -> Any:
        """``send`` that names the server span after the route when the response starts:
        routing is done by then, and the span is still open."""
        on_route = self.on_route

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


def _is_exposition(response: dict[str, Any] | None) -> bool:
    """A Prometheus text (``text/plain; version=0.0.4``) or OpenMetrics response?"""
    for name, value in (response or {}).get("headers") or ():
        if bytes(name).lower() == b"content-type":
            value = bytes(value).lower()
            return value.startswith(b"application/openmetrics-text") or (
                value.startswith(b"text/plain") and b"version=" in value
            )
    return False


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
