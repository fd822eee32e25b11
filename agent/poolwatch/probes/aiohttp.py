"""aiohttp client sessions: open connections per host, limits, requests queued for a connection.

- Hot path: class-level wrappers, not a ``TraceConfig``. As soon as a session has any
  TraceConfig, aiohttp builds a ``Trace`` and sends about six signals per request: an *empty*
  TraceConfig costs more than the issue's 3 % budget (bench_aiohttp measures it beside us). The
  methods that send the signals we need are wrapped instead: ``ClientSession._request`` (errors,
  a pass-through on success), ``BaseConnector._wait_for_available_connection`` (only called when
  the limits make a request queue: the wait time) and ``_create_connection`` (new connections).
- Collect time: open/idle/pending counts are read from each connector's private state (the
  public API has only ``limit`` and ``limit_per_host``), defensively: a private attribute that an
  aiohttp version lacks leaves its series out and is counted once in
  ``poolwatch_agent_errors_total{probe="aiohttp"}``.
- Connection lifetimes: no trace signal carries the connection, so ``_create_connection`` (called
  for new connections only) and ``ResponseHandler.connection_lost`` are wrapped at class level.

Sessions are grouped by name (``watch_aiohttp_session(session, name=...)``; unnamed sessions
share one group) and summed per host, so one-session-per-request code stays bounded.
"""

from __future__ import annotations

import weakref
from collections import Counter
from time import perf_counter
from typing import Any, NamedTuple

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector

from .._log import errors
from .._patching import subclasses, watch_new_instances
from .._types import Hooks, Stop
from .._types import Host as Agent
from ..metrics import (
    AIOHTTP_ERRORS,
    AIOHTTP_LIMIT,
    AIOHTTP_PENDING,
    AIOHTTP_WAIT_TIME,
    HTTP_CLIENT_DURATION,
    HTTP_CLIENT_OPEN,
    Point,
)
from ._http_client import ADDRESS, ERROR_TYPE, PORT, SCHEME, SCOPE, STATE, Events, Host, HostLabels

PROBE = "aiohttp"
STATE_ATTR = "_poolwatch_state"  # on watched connectors

# Private connector attributes read at collect time. Present with these shapes in aiohttp
# 3.9-3.14 (dict of ConnectionKey -> sequence/set); ``_acquired_per_host`` is only filled when
# ``limit_per_host > 0`` from 3.10 on, so without a per-host limit the open connections of a
# host are counted from poolwatch's own map of connection -> host (see ``_opened``).
IDLE_ATTR = "_conns"
PER_HOST_ATTR = "_acquired_per_host"
ACQUIRED_ATTR = "_acquired"
WAITERS_ATTR = "_waiters"
WAIT_METHOD = "_wait_for_available_connection"  # aiohttp >= 3.10.11

SESSION = "aiohttp.client.session.name"


class _Open(NamedTuple):
    host: Host
    scheme: str
    events: Events
    since: float | None  # None: opened before poolwatch saw it (no lifetime to record)


class _ConnectorState:
    __slots__ = ("hosts", "name")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.hosts: set[tuple[Host, str]] = set()  # (host, scheme) known: exported at zero


# Module state, reset by install() and its undo. Dicts are keyed by id() with weak references
# whose callbacks drop the entry: snapshots (``list(d.items())``) are atomic under the GIL,
# unlike iterating a WeakKeyDictionary from the exporter thread.
_labels = HostLabels(PROBE)  # host labels under the cap, events per (session name, host)
_host, _events_for, _unreadable = _labels.host, _labels.events_for, _labels.unreadable
_failed = _labels.failed  # features found unreadable (counted once each)
_agent: Agent | None = None  # set while installed
_connectors: dict[int, tuple[weakref.ref[BaseConnector], _ConnectorState]] = {}
_open: weakref.WeakKeyDictionary[ResponseHandler, _Open] = weakref.WeakKeyDictionary()


# --- hot path: class-level wrappers ------------------------------------------------------
def _events_of(connector: Any, host: str | None, port: int | None) -> Events | None:
    state = getattr(connector, STATE_ATTR, None)
    if state is None:
        return None  # a session poolwatch does not watch
    return _events_for(state.name, _host(host, port))


def _make_request(original: Any) -> Any:
    async def _request(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except Exception as exc:  # cancellation (a BaseException) is not the upstream's failure
            _count_error(self, args, kwargs, exc)
            raise

    return _request


def _count_error(session: aiohttp.ClientSession, args: Any, kwargs: Any, exc: Exception) -> None:
    try:
        url = session._build_url(args[1] if len(args) > 1 else kwargs["str_or_url"])
        state = getattr(session.connector, STATE_ATTR, None)
        if state is not None:
            _labels.error(state.name, _host(url.raw_host, url.port), type(exc).__qualname__)
    except Exception as inner:
        errors.record(PROBE, inner)


def _make_wait(original: Any) -> Any:
    async def _wait_for_available_connection(self: BaseConnector, key: Any, *args: Any) -> Any:
        # Re-queueing (woken, but beaten to the slot) loops inside: one call, one observation.
        # Only completed waits are timed: a cancelled or timed-out one raises past this.
        start = perf_counter()
        result = await original(self, key, *args)
        try:
            events = _events_of(self, key.host, key.port)
            if events is not None:
                events.wait_time.observe(perf_counter() - start)
        except Exception as exc:
            errors.record(PROBE, exc)
        return result

    return _wait_for_available_connection


# --- class-level wrappers: connection lifetimes, new sessions --------------------------------
def _opened(state: _ConnectorState, proto: Any, key: Any) -> None:
    host = _host(key.host, key.port)
    scheme = "https" if key.is_ssl else "http"
    state.hosts.add((host, scheme))
    _open[proto] = _Open(host, scheme, _events_for(state.name, host), perf_counter())


def _make_create_connection(original: Any) -> Any:
    async def _create_connection(self: BaseConnector, req: Any, *args: Any, **kwargs: Any) -> Any:
        proto = await original(self, req, *args, **kwargs)
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            try:
                _opened(state, proto, req.connection_key)
            except Exception as exc:
                errors.record(PROBE, exc)
        return proto

    return _create_connection


def _make_connection_lost(original: Any) -> Any:
    def connection_lost(self: ResponseHandler, exc: BaseException | None) -> Any:
        try:
            opened = _open.pop(self, None)
            if opened is not None and opened.since is not None:
                opened.events.duration.observe(perf_counter() - opened.since)
        except Exception as inner:
            errors.record(PROBE, inner)
        return original(self, exc)

    return connection_lost


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Agent, hooks: Hooks) -> None:
    global _agent
    _reset()
    _agent = agent
    _labels.agent = agent
    hooks.on_undo(_detach_all)
    session = aiohttp.ClientSession
    hooks.wrap(session, "_request", _make_request, "async (self, method, str_or_url, ...)")
    hooks.wrap(ResponseHandler, "connection_lost", _make_connection_lost, "(self, exc)")
    if not hooks.feature(BaseConnector, WAIT_METHOD, _make_wait, "async (self, key, ...)"):
        _failed.add("wait_time")  # its series is left out
    make, params = _make_create_connection, "async (self, req, ...)"
    hooks.require(BaseConnector, "_create_connection", params)
    for cls in subclasses(BaseConnector)[1:]:  # TCPConnector, UnixConnector...
        hooks.wrap(cls, "_create_connection", make, params, override=True)
    hooks.wrap(session, "__init__", watch_new_instances(agent, PROBE, watch), "(self, ...)")
    agent.registry.add(_SOURCE)


def start(agent: Agent) -> Stop | None:
    return None


def _reset() -> None:
    global _agent
    _labels.reset()
    _connectors.clear()
    _open.clear()
    _agent = None


def _detach_all() -> None:
    """Undo: take poolwatch's state off every connector."""
    for ref, _ in list(_connectors.values()):
        connector = ref()
        if connector is not None and STATE_ATTR in vars(connector):
            delattr(connector, STATE_ATTR)
    _reset()


# --- watching sessions ------------------------------------------------------------------------
WATCHES = aiohttp.ClientSession  # sessions made before instrument(): the agent's one heap walk


def existing(agent: Agent, session: aiohttp.ClientSession) -> None:
    if not session.closed:
        watch(agent, session)


def watch(agent: Agent, session: aiohttp.ClientSession, name: str | None = None) -> None:
    """Measure ``session``: its connector carries poolwatch's state, read at collect time."""
    connector = session.connector
    if _agent is None or connector is None or session.closed:
        return
    state = getattr(connector, STATE_ATTR, None)
    if state is None:
        state = _ConnectorState(name)
        setattr(connector, STATE_ATTR, state)
        ckey = id(connector)

        def gone(_: object) -> None:
            _connectors.pop(ckey, None)

        _connectors[ckey] = (weakref.ref(connector, gone), state)
    elif name:
        state.name = name


# --- collect time -------------------------------------------------------------------------------
class _Reading:
    """Per (name, host) sums over every connector of this process, built at collect time."""

    def __init__(self) -> None:
        self.open: Counter[tuple[str | None, Host, str, str]] = Counter()
        self.pending: Counter[tuple[str | None, Host]] = Counter()
        self.limits: dict[str | None, dict[str, int | None]] = {}
        self.missing: set[tuple[str | None, str]] = set()  # (name, feature) left out

    def read(self, connector: BaseConnector, state: _ConnectorState) -> None:
        name = state.name
        self._limits(name, connector)
        for host, scheme in list(state.hosts):  # known hosts exist at zero
            self.open[(name, host, scheme, "active")] += 0
            self.open[(name, host, scheme, "idle")] += 0
            self.pending[(name, host)] += 0
        for feature, read in (
            ("idle", self._idle),
            ("active", self._active),
            ("pending", self._pending),
        ):
            try:
                read(name, connector, state)
            except Exception as exc:
                _unreadable(feature, exc)
                self.missing.add((name, feature))

    def _limits(self, name: str | None, connector: BaseConnector) -> None:
        limits = self.limits.setdefault(name, {"total": 0, "per_host": 0})
        for scope, value in (("total", connector.limit), ("per_host", connector.limit_per_host)):
            # 0 is "no limit": a group with an unlimited connector has no limit to export
            current = limits[scope]
            limits[scope] = None if current is None or not value else current + value

    def _idle(self, name: str | None, connector: BaseConnector, state: _ConnectorState) -> None:
        for key, conns in list(getattr(connector, IDLE_ATTR).items()):
            host, scheme = _host(key.host, key.port), "https" if key.is_ssl else "http"
            state.hosts.add((host, scheme))
            for proto, _ in list(conns):
                if proto.is_connected():
                    self.open[(name, host, scheme, "idle")] += 1
                if proto not in _open:  # opened before poolwatch watched this connector
                    _open.setdefault(proto, _Open(host, scheme, _events_for(name, host), None))

    def _active(self, name: str | None, connector: BaseConnector, state: _ConnectorState) -> None:
        # Placeholders for connections being opened are not ResponseHandlers: not open yet.
        if connector.limit_per_host:
            for key, protos in list(getattr(connector, PER_HOST_ATTR).items()):
                host, scheme = _host(key.host, key.port), "https" if key.is_ssl else "http"
                state.hosts.add((host, scheme))
                count = sum(isinstance(p, ResponseHandler) for p in list(protos))
                self.open[(name, host, scheme, "active")] += count
        else:
            for proto in list(getattr(connector, ACQUIRED_ATTR)):
                opened = _open.get(proto) if isinstance(proto, ResponseHandler) else None
                if opened is not None:
                    self.open[(name, opened.host, opened.scheme, "active")] += 1

    def _pending(self, name: str | None, connector: BaseConnector, state: _ConnectorState) -> None:
        for key, waiters in list(getattr(connector, WAITERS_ATTR).items()):
            host = _host(key.host, key.port)
            state.hosts.add((host, "https" if key.is_ssl else "http"))
            self.pending[(name, host)] += sum(not w.done() for w in list(waiters))


class _Source:
    probe = PROBE

    def alive(self) -> bool:
        return True

    def points(self) -> list[Point]:
        reading = _Reading()
        seen: set[int] = set()
        for ref, state in list(_connectors.values()):
            connector = ref()
            if connector is None or connector.closed or id(connector) in seen:
                continue  # a closed or collected connector disappears from the output
            seen.add(id(connector))
            reading.read(connector, state)
        events = _labels.snapshot()
        named = any(name for name in reading.limits) or any(name for (name, _), _ in events)

        def labels(
            name: str | None, host: Host | None = None, more: dict[str, str] | None = None
        ) -> dict[str, str]:
            out = {ADDRESS: host[0], PORT: host[1]} if host else {}
            if named:  # empty for unnamed sessions: the same series as without the label
                out[SESSION] = name or ""
            return {**out, **(more or {})}

        points: list[Point] = []
        for (name, host, scheme, conn), count in sorted(reading.open.items(), key=_order):
            feature = "active" if conn == "active" else "idle"
            if (name, feature) not in reading.missing:
                points.append(
                    Point(
                        HTTP_CLIENT_OPEN, labels(name, host, {SCHEME: scheme, STATE: conn}), count
                    )
                )
        for (name, host), count in sorted(reading.pending.items(), key=_order):
            if (name, "pending") not in reading.missing:
                points.append(Point(AIOHTTP_PENDING, labels(name, host), count))
        for name, limits in sorted(reading.limits.items(), key=_order):
            for scope, value in limits.items():
                if value is not None:
                    points.append(Point(AIOHTTP_LIMIT, labels(name, None, {SCOPE: scope}), value))
        for (name, host), ev in sorted(events, key=_order):
            if "wait_time" not in _failed:
                points.append(Point(AIOHTTP_WAIT_TIME, labels(name, host), ev.wait_time.value()))
            points.append(Point(HTTP_CLIENT_DURATION, labels(name, host), ev.duration.value()))
            for error_type, count in _labels.errors_of(ev):
                points.append(
                    Point(AIOHTTP_ERRORS, labels(name, host, {ERROR_TYPE: error_type}), count)
                )
        return points


def _order(item: tuple[Any, Any]) -> str:
    return repr(item[0])


_SOURCE = _Source()
