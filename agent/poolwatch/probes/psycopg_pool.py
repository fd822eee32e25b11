"""psycopg 3 pools (``psycopg_pool``): ``AsyncConnectionPool`` and ``ConnectionPool``.

- Hot path: class-level wrappers around the public ``getconn`` and ``putconn`` (which
  ``connection()`` calls), through the shared checkout model of ``_pool_stats``: wait time,
  pending requests, use time per checkout; ``PoolTimeout`` counts as a timeout.
- Collect time: the sizes from the public ``get_stats()`` (``pool_size``, ``pool_available``,
  ``pool_min``, ``pool_max``). Never ``pop_stats()``: it resets the pool's counters for
  whoever else reads them.
- ``create_time``: the private ``_connect`` (connection plus the pool's ``configure``), a feature
  hook: a release that changed it leaves that series out.

Pools are named ``host:port/dbname`` from the conninfo (the semconv fallback, never user or
password), unless the app gave psycopg_pool a ``name=`` of its own (not the default ``pool-N``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from psycopg_pool.base import BasePool

from .._log import errors
from .._patching import watch_new_instances
from .._types import Hooks, Host, Stop
from ._pool_stats import (
    PoolGauges,
    PoolStats,
    checkout_hook,
    default_pool_name,
    return_hook,
    watch_by_id,
)
from .leaks import enabled as leak_detection

PROBE = "psycopg_pool"
DEFAULT_NAME = re.compile(r"pool-\d+")  # psycopg_pool's own name for an unnamed pool

_stats: dict[int, PoolStats] = {}  # id(pool) -> stats, while the pool lives
_times_creates = True


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, PoolTimeout)


def _make_connect(original: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    def record(pool: Any, start: float) -> None:
        stats = _stats.get(id(pool))
        if stats is not None:
            try:
                stats.created(perf_counter() - start)
            except Exception as exc:
                errors.record(PROBE, exc)

    if is_async:

        async def _connect_async(self: Any, timeout: float | None = None) -> Any:
            start = perf_counter()
            connection = await original(self, timeout)
            record(self, start)
            return connection

        return _connect_async

    def _connect(self: Any, timeout: float | None = None) -> Any:
        start = perf_counter()
        connection = original(self, timeout)
        record(self, start)
        return connection

    return _connect


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    global _times_creates
    _times_creates = True
    hooks.on_undo(_reset)
    creates = True
    for cls, is_async in ((AsyncConnectionPool, True), (ConnectionPool, False)):
        prefix = "async " if is_async else ""
        checkout = checkout_hook(
            PROBE, _stats, _timed_out, is_async=is_async, timeout_only=is_async
        )
        hooks.wrap(cls, "getconn", checkout, f"{prefix}(self, timeout)")
        back = return_hook(PROBE, _stats, is_async=is_async, param="conn")
        hooks.wrap(cls, "putconn", back, f"{prefix}(self, conn)")

        def make(original: Callable[..., Any], is_async: bool = is_async) -> Callable[..., Any]:
            return _make_connect(original, is_async)

        creates = hooks.feature(cls, "_connect", make, f"{prefix}(self, timeout)") and creates
        hooks.wrap(cls, "__init__", watch_new_instances(agent, PROBE, watch), "(self, ...)")
    _times_creates = creates


def _reset() -> None:
    global _times_creates
    for stats in list(_stats.values()):
        stats.detach()
    _stats.clear()
    _times_creates = True


WATCHES = BasePool  # both pools (and the null pools): the agent's one heap walk


def existing(agent: Host, pool: Any) -> None:
    if not (pool.closed and getattr(pool, "_opened", True)):  # open, or not opened yet
        watch(agent, pool)


def start(agent: Host) -> Stop | None:
    return None


def pool_name(pool: Any) -> str:
    """The app's own ``name=`` if it gave one, else ``host:port/dbname``."""
    name = getattr(pool, "name", None)
    if isinstance(name, str) and name and not DEFAULT_NAME.fullmatch(name):
        return name
    params: dict[str, Any] = {}
    conninfo = getattr(pool, "conninfo", "")
    if isinstance(conninfo, str) and conninfo:  # it may be a function (psycopg_pool 3.3)
        try:
            from psycopg.conninfo import conninfo_to_dict

            params = conninfo_to_dict(conninfo)
        except Exception:  # a DSN psycopg cannot read: the connect will say so, not poolwatch
            params = {}
    kwargs = getattr(pool, "kwargs", None)
    if isinstance(kwargs, dict):
        params.update({k: v for k, v in kwargs.items() if k in ("host", "port", "dbname")})
    host = params.get("host")
    port = params.get("port") or (5432 if host else None)
    return default_pool_name(host, port, params.get("dbname"))


def _gauges(ref: weakref.ref[Any]) -> PoolGauges | None:
    pool = ref()
    if pool is None or (pool.closed and getattr(pool, "_opened", True)):
        return None  # gone, or closed for good (a pool is opened once): its name is free again
    stats = pool.get_stats()  # public and read-only, unlike pop_stats()
    size, available = stats["pool_size"], stats["pool_available"]
    return PoolGauges(
        used=max(size - available, 0),
        idle=available,
        idle_min=stats["pool_min"],
        max=stats["pool_max"],
    )


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
        ),
    )
