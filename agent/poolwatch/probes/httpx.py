"""httpx clients, through the httpcore connection pools behind them (``httpx.AsyncClient`` and
``httpx.Client``, their mounts, and httpcore used directly).

Every ``httpcore.AsyncConnectionPool``/``ConnectionPool`` is watched, whoever made it: the
transport of a client, each mounted ``HTTPTransport``, a proxy's pool (``HTTPProxy`` and
``SOCKSProxy`` are pool subclasses). A custom transport without an httpcore pool (``MockTransport``,
``ASGITransport``, a transport of another library) has no connections to count.

- Hot path: class-level wrappers. ``handle_async_request``/``handle_request`` of the pool
  (errors by type; the wait time of every request that got its response: 0 when a connection
  was free), ``PoolRequest.wait_for_connection`` (timed only when the request is queued, i.e.
  no connection was free), ``create_connection`` (a new connection: its host and the start of
  its lifetime).
- Collect time: open connections per host and state, requests queued per host and the limits
  are read from each pool's private state (httpcore's public API has none of them),
  defensively: a figure this httpcore release keeps elsewhere leaves its series out and is
  counted once in ``poolwatch_agent_errors_total{probe="httpx"}``.
- Connection lifetimes (``http.client.connection.duration``): from ``create_connection`` until
  the pool lets go of the connection object (a weak reference's callback), as httpcore has no
  close hook shared by every way a connection ends.

Series are grouped by ``httpx.client.name`` (``watch_httpx_client(client, name=...)``; unnamed
clients share ``default``) and summed per host with aiohttp's host cap and ``other`` bucket.
"""

from __future__ import annotations

import weakref
from collections import Counter
from time import perf_counter
from typing import Any, NamedTuple

import httpcore
from httpcore._async.connection_pool import AsyncPoolRequest
from httpcore._sync.connection_pool import PoolRequest

from .._log import errors
from .._patching import watch_new_instances
from .._types import Hooks, Host, Stop
from ..metrics import (
    HTTP_CLIENT_DURATION,
    HTTP_CLIENT_OPEN,
    HTTPX_ERRORS,
    HTTPX_LIMIT,
    HTTPX_PENDING,
    HTTPX_WAIT_TIME,
    Point,
)
from ._http_client import ADDRESS, ERROR_TYPE, PORT, SCHEME, SCOPE, STATE, Events, HostLabels
from ._http_client import Host as Server
from ._pool_stats import mark_async

PROBE = "httpx"
CLIENT = "httpx.client.name"
DEFAULT_GROUP = "default"  # never empty: an empty label would merge with aiohttp's series
WAITED = "_poolwatch_waited"  # on a request: seconds it spent queued for a connection
DEFAULT_PORTS = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}


class _Pool:
    __slots__ = ("name", "ref")

    def __init__(self, ref: weakref.ref[Any], name: str) -> None:
        self.ref = ref
        self.name = name


class _Lifetime:
    """One connection's life, ended once: when the connection object is freed (a weak
    reference's callback) or when a collection finds it closed or out of its pool, whichever
    comes first."""

    __slots__ = ("done", "events", "since")

    def __init__(self, events: Events) -> None:
        self.events = events
        self.since = perf_counter()
        self.done = False

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.events.duration.observe(perf_counter() - self.since)


class _Open(NamedTuple):
    host: Server
    scheme: str
    life: _Lifetime


_labels = HostLabels(PROBE)
_pools: dict[int, _Pool] = {}  # id(pool) -> its group, while the pool lives
_open: weakref.WeakKeyDictionary[Any, _Open] = weakref.WeakKeyDictionary()
# id(connection) -> (weak reference, lifetime), while it lives: a plain dict, so that the
# exporter thread can snapshot it atomically (unlike a WeakKeyDictionary)
_lifetimes: dict[int, tuple[weakref.ref[Any], _Lifetime]] = {}
_known: set[tuple[str, Server, str]] = set()  # (group, host, scheme) seen: exported at zero


def _server(origin: Any) -> tuple[Server, str]:
    scheme = origin.scheme
    host = origin.host.decode("ascii", "replace")
    port = origin.port or DEFAULT_PORTS.get(scheme)
    return _labels.host(host, port), scheme.decode("ascii", "replace")


# --- hot path -----------------------------------------------------------------------------------
def _count_error(pool: Any, request: Any, exc: Exception) -> None:
    try:
        known = _pools.get(id(pool))
        if known is not None:
            server, _ = _server(request.url.origin)
            _labels.error(known.name, server, type(exc).__qualname__)
    except Exception as inner:
        errors.record(PROBE, inner)


def _count_wait(pool: Any, request: Any) -> None:
    """A request got its connection and its response: one wait (0 when a connection was
    free), however many times httpcore re-queued it (a connection that turned out busy)."""
    try:
        known = _pools.get(id(pool))
        if known is not None:
            server, _ = _server(request.url.origin)
            waited = request.__dict__.pop(WAITED, 0.0)
            _labels.events_for(known.name, server).wait_time.observe(waited)
    except Exception as exc:
        errors.record(PROBE, exc)


def _make_handle_async(original: Any) -> Any:
    async def handle_async_request(self: Any, request: Any) -> Any:
        try:
            response = await original(self, request)
        except Exception as exc:  # cancellation (a BaseException) is not the upstream's failure
            _count_error(self, request, exc)
            raise
        _count_wait(self, request)
        return response

    return handle_async_request


def _make_handle(original: Any) -> Any:
    def handle_request(self: Any, request: Any) -> Any:
        try:
            response = original(self, request)
        except Exception as exc:
            _count_error(self, request, exc)
            raise
        _count_wait(self, request)
        return response

    return handle_request


def _queued(pool_request: Any, start: float) -> None:
    try:
        attributes = pool_request.request.__dict__
        attributes[WAITED] = attributes.get(WAITED, 0.0) + perf_counter() - start
    except Exception as exc:
        errors.record(PROBE, exc)


async def _timed_wait(pool_request: Any, waiting: Any) -> Any:
    start = perf_counter()  # queued; only completed waits count (a timeout raises)
    connection = await waiting
    _queued(pool_request, start)
    return connection


def _make_wait_async(original: Any) -> Any:
    def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        if self.connection is not None:  # a connection was free: the usual path, no frame
            return original(self, timeout)
        return _timed_wait(self, original(self, timeout))

    return mark_async(wait_for_connection)


def _make_wait(original: Any) -> Any:
    def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        if self.connection is not None:
            return original(self, timeout)
        start = perf_counter()
        connection = original(self, timeout)
        _queued(self, start)
        return connection

    return wait_for_connection


def _make_create_connection(original: Any) -> Any:
    def create_connection(self: Any, origin: Any) -> Any:
        connection = original(self, origin)
        known = _pools.get(id(self))
        if known is not None:
            try:
                _opened(known.name, connection, origin)
            except Exception as exc:
                errors.record(PROBE, exc)
        return connection

    return create_connection


def _opened(group: str, connection: Any, origin: Any) -> None:
    server, scheme = _server(origin)
    _known.add((group, server, scheme))
    life = _Lifetime(_labels.events_for(group, server))
    _open[connection] = _Open(server, scheme, life)

    key = id(connection)

    def freed(_: object) -> None:
        _lifetimes.pop(key, None)
        life.end()

    _lifetimes[key] = (weakref.ref(connection, freed), life)


def _sweep(in_pools: set[int], started: float) -> None:
    """At collect time: end the lifetimes of connections closed or dropped by their pool (a
    connection closed by the server leaves its pool without a close call poolwatch could
    hook, and may outlive it in a reference cycle)."""
    for key, (ref, life) in list(_lifetimes.items()):
        connection = ref()
        dropped = key not in in_pools and life.since < started  # not one made meanwhile
        if connection is None or dropped or connection.is_closed():
            life.end()
            _lifetimes.pop(key, None)


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    _reset()
    _labels.agent = agent
    hooks.on_undo(_reset)
    for pool, handle, make_handle, pool_request, make_wait, prefix in (
        (
            httpcore.AsyncConnectionPool,
            "handle_async_request",
            _make_handle_async,
            AsyncPoolRequest,
            _make_wait_async,
            "async ",
        ),
        (httpcore.ConnectionPool, "handle_request", _make_handle, PoolRequest, _make_wait, ""),
    ):
        hooks.wrap(pool, handle, make_handle, f"{prefix}(self, request)")
        if not hooks.feature(
            pool_request, "wait_for_connection", make_wait, f"{prefix}(self, timeout)"
        ):
            _labels.failed.add("wait_time")
        if not hooks.feature(pool, "create_connection", _make_create_connection, "(self, origin)"):
            _labels.failed.add("duration")
        hooks.wrap(pool, "__init__", watch_new_instances(agent, PROBE, watch), "(self, ...)")
    agent.registry.add(_SOURCE)


def _reset() -> None:
    _labels.reset()
    _pools.clear()
    _open.clear()
    _lifetimes.clear()
    _known.clear()


# pools made before instrument() (a client's, a mount's, a proxy's): the agent's one heap walk
WATCHES = (httpcore.AsyncConnectionPool, httpcore.ConnectionPool)


def existing(agent: Host, pool: Any) -> None:
    watch(agent, pool)


def start(agent: Host) -> Stop | None:
    return None


def _pools_of(obj: Any) -> list[Any]:
    """The httpcore pools of an httpx client (its transport and mounts), or ``obj`` itself."""
    if isinstance(obj, httpcore.AsyncConnectionPool | httpcore.ConnectionPool):
        return [obj]
    transports = [getattr(obj, "_transport", None), *getattr(obj, "_mounts", {}).values()]
    found = [getattr(t, "_pool", None) for t in transports if t is not None]
    return [
        p for p in found if isinstance(p, httpcore.AsyncConnectionPool | httpcore.ConnectionPool)
    ]


def watch(agent: Host, obj: Any, name: str | None = None) -> None:
    """Measure an httpx client's pools (or one httpcore pool); ``name`` groups their series."""
    for pool in _pools_of(obj):
        known = _pools.get(id(pool))
        if known is not None:
            if name:
                known.name = name
            continue
        key = id(pool)

        def gone(_: object, key: int = key) -> None:
            _pools.pop(key, None)

        _pools[key] = _Pool(weakref.ref(pool, gone), name or DEFAULT_GROUP)


# --- collect time -------------------------------------------------------------------------------
class _Reading:
    """Per (group, host) sums over every watched pool of this process."""

    def __init__(self) -> None:
        self.open: Counter[tuple[str, Server, str, str]] = Counter()
        self.pending: Counter[tuple[str, Server]] = Counter()
        self.limits: dict[str, dict[str, int | None]] = {}
        self.missing: set[tuple[str, str]] = set()  # (group, feature) left out
        self.in_pools: set[int] = set()  # ids of the connections in the pools now

    def read(self, pool: Any, name: str) -> None:
        for feature, read in (
            ("limits", self._limits),
            ("connections", self._connections),
            ("pending", self._pending),
        ):
            try:
                read(pool, name)
            except Exception as exc:
                _labels.unreadable(feature, exc)
                self.missing.add((name, feature))

    def _limits(self, pool: Any, name: str) -> None:
        limits = self.limits.setdefault(name, {"total": 0, "keepalive": 0})
        for scope, value in (
            ("total", pool._max_connections),
            ("keepalive", pool._max_keepalive_connections),
        ):
            current = limits[scope]  # sys.maxsize is httpx's "no limit": no limit to export
            limits[scope] = None if current is None or value >= 2**62 else current + value

    def _connections(self, pool: Any, name: str) -> None:
        for connection in list(pool._connections):
            opened = _open.get(connection)
            if opened is None:  # made before poolwatch watched this pool
                origin = getattr(connection, "_origin", None) or connection._remote_origin
                server, scheme = _server(origin)
            else:
                server, scheme = opened.host, opened.scheme
            self.open[(name, server, scheme, "idle")] += 0  # a known host exists at zero
            self.open[(name, server, scheme, "active")] += 0
            self.pending[(name, server)] += 0
            self.in_pools.add(id(connection))
            if connection.is_closed():  # still in the pool's list until its next request
                continue
            if getattr(connection, "_connection", ...) is None:
                continue  # not connected yet (or never: its request was cancelled): not open
            state = "idle" if connection.is_idle() else "active"
            self.open[(name, server, scheme, state)] += 1

    def _pending(self, pool: Any, name: str) -> None:
        for pool_request in list(pool._requests):
            if pool_request.is_queued():
                server, _ = _server(pool_request.request.url.origin)
                self.pending[(name, server)] += 1


class _Source:
    probe = PROBE

    def alive(self) -> bool:
        return True

    def points(self) -> list[Point]:
        reading, started = _Reading(), perf_counter()
        for known in list(_pools.values()):
            pool = known.ref()
            if pool is not None:
                reading.read(pool, known.name)
        if not any(feature == "connections" for _, feature in reading.missing):
            _sweep(reading.in_pools, started)
        for (name, server), _ in _labels.snapshot():  # hosts seen by the hooks exist at zero
            reading.pending[(name or DEFAULT_GROUP, server)] += 0
        for name, server, scheme in list(_known):
            for state in ("active", "idle"):
                reading.open[(name, server, scheme, state)] += 0

        def labels(name: str, server: Server | None, **more: str) -> dict[str, str]:
            out = {ADDRESS: server[0], PORT: server[1]} if server else {}
            return {**out, CLIENT: name, **more}

        points: list[Point] = []
        for (name, server, scheme, state), count in sorted(reading.open.items()):
            if (name, "connections") not in reading.missing:
                attributes = labels(name, server, **{SCHEME: scheme, STATE: state})
                points.append(Point(HTTP_CLIENT_OPEN, attributes, count))
        for (name, server), count in sorted(reading.pending.items()):
            if (name, "pending") not in reading.missing:
                points.append(Point(HTTPX_PENDING, labels(name, server), count))
        for name, limits in sorted(reading.limits.items()):
            for scope, value in limits.items():
                if value is not None and (name, "limits") not in reading.missing:
                    points.append(Point(HTTPX_LIMIT, labels(name, None, **{SCOPE: scope}), value))
        for (group, server), events in sorted(_labels.snapshot(), key=lambda item: repr(item[0])):
            name = group or DEFAULT_GROUP
            if "wait_time" not in _labels.failed:
                points.append(
                    Point(HTTPX_WAIT_TIME, labels(name, server), events.wait_time.value())
                )
            if "duration" not in _labels.failed:
                duration = events.duration.value()
                points.append(Point(HTTP_CLIENT_DURATION, labels(name, server), duration))
            for error_type, count in _labels.errors_of(events):
                attributes = labels(name, server, **{ERROR_TYPE: error_type})
                points.append(Point(HTTPX_ERRORS, attributes, count))
        return points


_SOURCE = _Source()
