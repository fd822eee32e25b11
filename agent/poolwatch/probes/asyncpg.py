"""asyncpg pools: a wrapper around acquire/release; sizes from the public ``get_*_size()``.

asyncpg has no acquire hook, so ``Pool._acquire`` (where the wait happens) and ``Pool.release``
are wrapped at class level. ``Pool`` has ``__slots__`` without ``__weakref__``: pools are held
here by id and let go of on ``close()``/``terminate()``, which also frees the pool's name (the
next pool made with the same DSN gets it again) and drops the last reference poolwatch had.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

from asyncpg.pool import Pool

from .._log import errors
from .._patching import watch_new_instances
from .._types import Hooks, Host, Stop
from ._pool_stats import PoolGauges, PoolStats, default_pool_name
from .leaks import enabled as leak_detection

PROBE = "asyncpg"
_stats: dict[int, PoolStats] = {}  # id(pool) -> stats, while the pool is open
_times_creates = True  # Pool._get_new_connection could be wrapped


def _make_acquire(original: Any) -> Any:
    async def _acquire(self: Pool, timeout: float | None) -> Any:
        stats = _stats.get(id(self))
        if stats is None:
            return await original(self, timeout)
        try:
            token = stats.wait_begin()
        except Exception as exc:
            errors.record(PROBE, exc)
            return await original(self, timeout)
        try:
            proxy = await original(self, timeout)
        except BaseException as exc:  # CancelledError too: pending stays exact, then re-raised
            try:
                stats.wait_failed(token, isinstance(exc, TimeoutError))
            except Exception as inner:
                errors.record(PROBE, inner)
            raise
        try:
            # Holders are fixed per pool, so keys stay bounded by max_size.
            stats.wait_end(token, id(proxy._holder))
        except Exception as exc:
            errors.record(PROBE, exc)
        return proxy

    return _acquire


def _make_release(original: Any) -> Any:
    async def release(self: Pool, connection: Any, *, timeout: float | None = None) -> Any:
        stats = _stats.get(id(self))
        if stats is not None:
            try:
                holder = getattr(connection, "_holder", None)
                if holder is not None:
                    stats.returned(id(holder))
            except Exception as exc:
                errors.record(PROBE, exc)
        return await original(self, connection, timeout=timeout)

    return release


def _make_new_connection(original: Any) -> Any:
    async def _get_new_connection(self: Pool) -> Any:
        start = perf_counter()
        connection = await original(self)
        stats = _stats.get(id(self))
        if stats is not None:
            try:
                stats.created(perf_counter() - start)
            except Exception as exc:
                errors.record(PROBE, exc)
        return connection

    return _get_new_connection


def _no_gauges() -> None:
    return None


def _drop(pool: Pool) -> None:
    stats = _stats.pop(id(pool), None)
    if stats is not None:
        stats.closed = True
        stats.read_gauges = _no_gauges  # the one reference to the pool: let it be freed
        stats.detach()


def _make_close(original: Any) -> Any:
    async def close(self: Pool) -> None:
        try:
            await original(self)
        finally:
            _drop(self)

    return close


def _make_terminate(original: Any) -> Any:
    def terminate(self: Pool) -> None:
        try:
            original(self)
        finally:
            _drop(self)

    return terminate


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    hooks.on_undo(_stats.clear)
    hooks.wrap(Pool, "_acquire", _make_acquire, "async (self, timeout)")
    hooks.wrap(Pool, "release", _make_release, "async (self, connection, *, timeout)")
    hooks.wrap(Pool, "close", _make_close, "async (self)")
    hooks.wrap(Pool, "terminate", _make_terminate, "(self)")
    # private, and create_time alone needs it: the probe runs on without it
    global _times_creates
    _times_creates = hooks.feature(
        Pool, "_get_new_connection", _make_new_connection, "async (self)"
    )
    hooks.wrap(Pool, "__init__", watch_new_instances(agent, PROBE, watch), "(self, ...)")


WATCHES = Pool  # pools made before instrument() are found by the agent's one heap walk


def existing(agent: Host, pool: Pool) -> None:
    if not pool.is_closing():
        watch(agent, pool)


def start(agent: Host) -> Stop | None:
    return None


def pool_name(pool: Pool) -> str:
    """From the connect arguments: host, port and database only, never user or password."""
    kwargs: dict[str, Any] = dict(getattr(pool, "_connect_kwargs", None) or {})
    args = getattr(pool, "_connect_args", None) or []
    host, port, database = kwargs.get("host"), kwargs.get("port"), kwargs.get("database")
    dsn = args[0] if args and isinstance(args[0], str) else kwargs.get("dsn")
    if dsn:
        try:
            parts = urlsplit(dsn)
            host = host or parts.hostname
            port = port or parts.port
            database = database or parts.path.lstrip("/") or None
        except ValueError:  # multi-host DSNs and other shapes urlsplit cannot read
            pass
    if isinstance(host, list | tuple):
        host = ",".join(map(str, host))
    return default_pool_name(host, port or (5432 if host else None), database)


def _gauges(pool: Pool) -> PoolGauges | None:
    if pool.is_closing():
        return None
    size = pool.get_size()
    idle = pool.get_idle_size()
    return PoolGauges(
        used=size - idle,
        idle=idle,
        idle_max=pool.get_max_size(),
        idle_min=pool.get_min_size(),
        max=pool.get_max_size(),
    )


def watch(agent: Host, pool: Pool, name: str | None = None) -> PoolStats:
    stats = _stats.get(id(pool))
    if stats is not None:
        if name and name != stats.wanted:
            stats.rename(name)
        return stats
    stats = PoolStats(
        PROBE,
        name or pool_name(pool),
        lambda: _gauges(pool),
        track_leaks=leak_detection(agent),
        times_creates=_times_creates,
    )
    _stats[id(pool)] = stats
    stats.attach(agent.registry)
    return stats
