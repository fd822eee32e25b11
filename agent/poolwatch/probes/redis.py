"""redis-py pools, ``redis.asyncio`` and ``redis``: the ``db.client.connection.*`` set.

- Hot path: class-level wrappers around ``ConnectionPool.get_connection`` and ``release`` (and
  ``BlockingConnectionPool``'s own), through the shared checkout model of ``_pool_stats``: wait
  time, pending requests, use time, and timeouts, which are both the default pool's
  ``MaxConnectionsError`` ("Too many connections": no connection for this request) and
  ``BlockingConnectionPool``'s "No connection available." after its ``timeout``.
- Collect time: ``max_connections`` is public; the idle connections are private state, read
  defensively (a release that moved them leaves ``state="idle"`` out, counted once); the used
  count is poolwatch's own count of checked-out connections, exact from the hooks.
- ``create_time``: the first ``connect()`` (socket, AUTH, SELECT, HELLO) of each connection
  the pool makes (``make_connection``, a feature hook: left out if it changed), timed by a
  one-shot wrapper on the connection itself, so that checkouts pay nothing for it.
- redis-py >= 7.2 records some of these figures itself when its OpenTelemetry metrics are on
  (``redis.observability``): poolwatch then leaves those series out for redis pools (see
  ``_left_out``), so that no figure is counted twice.

Pools are named ``host:port/db`` from the pool's connection arguments (``path/db`` for a Unix
socket), never user or password.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Collection
from time import perf_counter
from typing import Any

import redis
import redis.asyncio
import redis.exceptions
from redis import connection as sync_connection
from redis.asyncio import connection as async_connection

from .._log import errors
from .._patching import watch_new_instances
from .._types import Hooks, Host, Stop
from ..metrics import DB_COUNT, DB_CREATE_TIME, DB_TIMEOUTS, DB_WAIT_TIME, Metric
from ._pool_stats import (
    PoolGauges,
    PoolStats,
    checkout_hook,
    default_pool_name,
    return_hook,
    watch_by_id,
)
from .leaks import enabled as leak_detection

PROBE = "redis"
TIMEOUT_MESSAGES = ("Too many connections", "No connection available.")

_stats: dict[int, PoolStats] = {}  # id(pool) -> stats, while the pool lives
_failed: set[str] = set()  # collect-time figures found unreadable (counted once each)
_lock = threading.Lock()
_times_creates = True


def _timed_out(exc: BaseException) -> bool:
    """No connection for this request: the default pool's MaxConnectionsError (a plain
    ConnectionError before redis 6), or BlockingConnectionPool's wait that ran out."""
    if isinstance(exc, getattr(redis.exceptions, "MaxConnectionsError", ())):
        return True
    return isinstance(exc, redis.exceptions.ConnectionError) and str(exc) in TIMEOUT_MESSAGES


# --- create_time: the first connect of each connection the pool makes ------------------------
# ``connect()`` runs on every checkout (``ensure_connection``): rather than a class-level hook
# there, each new connection gets, on the instance, a one-shot wrapper that times its first
# connect (socket, AUTH, SELECT, HELLO) and takes itself off; later checkouts call the class's
# own method, with nothing of poolwatch's in between.
CONNECT = "connect"


def _time_first_connect(connection: Any, stats: PoolStats, is_async: bool) -> None:
    attributes = connection.__dict__
    if CONNECT in attributes:  # timed already (a subclass's make_connection calling its base's)
        return
    connect = connection.connect  # the class's method, bound

    if is_async:

        async def first_connect_async() -> Any:
            attributes.pop(CONNECT, None)
            start = perf_counter()
            result = await connect()
            stats.created(perf_counter() - start)
            return result

        attributes[CONNECT] = first_connect_async
        return

    def first_connect() -> Any:
        attributes.pop(CONNECT, None)
        start = perf_counter()
        result = connect()
        stats.created(perf_counter() - start)
        return result

    attributes[CONNECT] = first_connect


def _make_make_connection(is_async: bool) -> Callable[..., Any]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def make_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
            connection = original(self, *args, **kwargs)
            stats = _stats.get(id(self))
            if stats is not None:
                try:
                    _time_first_connect(connection, stats, is_async)
                except Exception as exc:
                    errors.record(PROBE, exc)
            return connection

        return make_connection

    return make


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    global _times_creates
    _times_creates = True
    hooks.on_undo(_reset)
    for module, is_async in ((async_connection, True), (sync_connection, False)):
        shape = "async (self, ...)" if is_async else "(self, ...)"
        give_back = "async (self, connection)" if is_async else "(self, connection)"
        checkout = checkout_hook(PROBE, _stats, _timed_out, is_async=is_async)
        back = return_hook(PROBE, _stats, is_async=is_async)
        for cls in (module.ConnectionPool, module.BlockingConnectionPool):
            hooks.wrap(cls, "get_connection", checkout, shape)
            hooks.wrap(cls, "release", back, give_back)
        # create_time alone needs these: the probe runs on without them
        make = _make_make_connection(is_async)
        creates = hooks.feature(module.ConnectionPool, "make_connection", make, "(self)")
        _times_creates = _times_creates and creates
        if "make_connection" in vars(module.BlockingConnectionPool):  # the sync one's own
            hooks.feature(module.BlockingConnectionPool, "make_connection", make, "(self)")
        # BlockingConnectionPool.__init__ calls this one: its pools are watched there too
        watch_new = watch_new_instances(agent, PROBE, watch)
        hooks.wrap(module.ConnectionPool, "__init__", watch_new, "(self, ...)")


def _reset() -> None:
    global _times_creates
    for stats in list(_stats.values()):
        stats.detach()
    _stats.clear()
    _failed.clear()
    _times_creates = True


# pools made before instrument(), found by the agent's one heap walk (no common base class)
WATCHES = (async_connection.ConnectionPool, sync_connection.ConnectionPool)


def existing(agent: Host, pool: Any) -> None:
    watch(agent, pool)


def start(agent: Host) -> Stop | None:
    return None


def pool_name(pool: Any) -> str:
    """``host:port/db`` (``path/db`` for a Unix socket): never user or password."""
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    db = str(kwargs.get("db", 0))
    path = kwargs.get("path")
    if path:
        return f"{path}/{db}"
    return default_pool_name(kwargs.get("host", "localhost"), kwargs.get("port", 6379), db)


def _unreadable(feature: str, exc: BaseException) -> None:
    with _lock:
        first = feature not in _failed
        _failed.add(feature)
    if first:
        errors.record(PROBE, exc)


def _idle(pool: Any) -> int | None:
    try:
        queue = getattr(pool, "pool", None)
        if queue is not None and hasattr(queue, "queue"):  # sync BlockingConnectionPool
            return sum(c is not None for c in list(queue.queue))
        return len(pool._available_connections)
    except Exception as exc:
        _unreadable("idle", exc)
        return None


def _gauges(ref: weakref.ref[Any]) -> PoolGauges | None:
    pool = ref()
    if pool is None:
        return None
    return PoolGauges(used=None, idle=_idle(pool), max=pool.max_connections)


def _left_out() -> Collection[Metric]:
    """The series redis-py's own OpenTelemetry metrics record (redis >= 7.2, once the app
    called ``get_observability_instance().init(OTelConfig(...))``): CONNECTION_BASIC has the
    connection count and create time, CONNECTION_ADVANCED the timeouts and wait time."""
    providers = sys.modules.get("redis.observability.providers")
    if providers is None:
        return ()
    try:
        instance = providers.get_observability_instance()
        if not instance.is_enabled():
            return ()
        groups = instance.get_provider_manager().config.metric_groups
        from redis.observability.config import MetricGroup

        out: list[Metric] = []
        if MetricGroup.CONNECTION_BASIC in groups:
            out += [DB_COUNT, DB_CREATE_TIME]
        if MetricGroup.CONNECTION_ADVANCED in groups:
            out += [DB_TIMEOUTS, DB_WAIT_TIME]
        return out
    except Exception as exc:
        _unreadable("observability", exc)
        return ()


def watch(agent: Host, pool: Any, name: str | None = None) -> PoolStats:
    return watch_by_id(
        _stats,
        agent.registry,
        pool,
        name,
        lambda ref: PoolStats(
            PROBE,
            name or pool_name(pool),
            lambda: _gauges(ref),
            track_leaks=leak_detection(agent),
            times_creates=_times_creates,
            left_out=_left_out,
        ),
    )
