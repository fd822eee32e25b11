"""SQLAlchemy engine pools, sync and async.

Hot path: class-level wrappers around ``Pool.connect`` (wait time, pending, timeouts, start of
use) and ``Pool._return_conn`` (use time). PoolEvents has no "before checkout" hook, hence the
wrappers; rarer events (invalidate, detach, connect) use public pool events. Sizes are read
from ``engine.pool`` at collect time: ``engine.dispose()`` swaps the pool and the gauges follow.
Listeners sit on the pool and travel with ``Pool.recreate()``.

Names: an engine holds its pool name while it is open. ``dispose()`` frees it (the engine's
series go away with it) and the engine's next new connection (the pool's "connect" event, not
the checkout path) claims it again; an engine garbage collected frees it at once (a weakref
callback). So an app that makes and disposes its engine at each start-up keeps one name.
"""

from __future__ import annotations

import os
import weakref
from time import perf_counter
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

from .._histogram import FOLD_AT
from .._log import errors
from .._patching import subclasses, watch_new_instances
from .._types import Hooks, Host, Stop
from ._pool_stats import PoolGauges, PoolStats, default_pool_name
from .leaks import enabled as leak_detection

PROBE = "sqlalchemy"
ATTR = "_poolwatch_stats"  # on Pool instances; the class default is None (fast miss)


def _make_connect(original: Any) -> Any:
    # The bookkeeping is inlined (no PoolStats method calls): this runs on every checkout and
    # each Python call costs ~70 ns of a 2 µs budget. Every step is one atomic C operation.
    def connect(self: Pool) -> Any:
        stats: PoolStats | None = self._poolwatch_stats  # type: ignore[attr-defined]
        if stats is None:
            return original(self)
        waiting = stats.waiting
        token = next(stats.tokens)
        waiting[token] = start = perf_counter()
        if len(waiting) > stats.peak_pending:  # high-water marks, read at collect time
            stats.new_peak()
        try:
            connection = original(self)
        except BaseException as exc:
            del waiting[token]
            if isinstance(exc, sa_exc.TimeoutError):
                stats.timed_out()
            raise
        now = perf_counter()
        del waiting[token]
        try:
            new = stats.wait_time.new  # Histogram.observe, inlined
            new.append(now - start)
            if len(new) >= FOLD_AT:
                stats.wait_time.fold()
            held = stats.held
            held[id(connection._connection_record)] = now
            if len(held) > stats.peak_used:
                stats.new_peak()
        except Exception as exc:
            errors.record(PROBE, exc)
        return connection

    return connect


def _make_return_conn(original: Any) -> Any:
    # Every checkin funnels through Pool._return_conn (SQLAlchemy 1.4-2.1). Wrapping it costs
    # ~0.35 µs against ~0.85 µs for a public "checkin" listener (event dispatch is ~0.45 µs
    # alone), which is the difference between meeting the 2 µs budget and missing it.
    def _return_conn(self: Pool, record: Any) -> Any:
        stats: PoolStats | None = self._poolwatch_stats  # type: ignore[attr-defined]
        if stats is not None:
            try:
                start = stats.held.pop(id(record), None)
                if start is not None:
                    new = stats.use_time.new  # Histogram.observe, inlined
                    new.append(perf_counter() - start)
                    if len(new) >= FOLD_AT:
                        stats.use_time.fold()
            except Exception as exc:
                errors.record(PROBE, exc)
        return original(self, record)

    return _return_conn


def _make_dispose(original: Any) -> Any:
    # dispose() frees the engine's pool name. Hooked on the class rather than through the
    # "engine_disposed" event: a listener of any connection event makes SQLAlchemy send every
    # statement of that engine through its event dispatch (engine._has_events), which cost
    # ~100,000 CPU instructions per request of a one-query route (bench_http --instructions).
    def dispose(self: Engine, close: bool = True) -> None:
        original(self, close)
        stats: PoolStats | None = getattr(self.pool, ATTR, None)  # recreate() carried it over
        if stats is not None:
            try:
                stats.detach()
            except Exception as exc:
                errors.record(PROBE, exc)

    return dispose


def _make_recreate(original: Any) -> Any:
    def recreate(self: Pool) -> Pool:
        new_pool: Pool = original(self)
        stats = self._poolwatch_stats  # type: ignore[attr-defined]
        if stats is not None:
            setattr(new_pool, ATTR, stats)
        return new_pool

    return recreate


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    """Class-level hooks on every pool class; engines made from now on are watched at once."""
    Pool._poolwatch_stats = None  # type: ignore[attr-defined]
    hooks.on_undo(lambda: delattr(Pool, ATTR))
    hooks.wrap(Pool, "connect", _make_connect, "(self)")
    hooks.wrap(Pool, "_return_conn", _make_return_conn, "(self, record)")
    hooks.wrap(Pool, "recreate", _make_recreate, "(self)")
    for cls in subclasses(Pool)[1:]:  # StaticPool, SingletonThreadPool... override connect()
        for name, make, params in (
            ("connect", _make_connect, "(self)"),
            ("recreate", _make_recreate, "(self)"),
            ("_return_conn", _make_return_conn, "(self, record)"),
        ):
            hooks.wrap(cls, name, make, params, override=True)
    hooks.feature(Engine, "dispose", _make_dispose, "(self, close)")  # else names stay held
    make_init = watch_new_instances(agent, PROBE, watch)
    hooks.wrap(Engine, "__init__", make_init, "(self, ...)")


WATCHES = Engine  # engines made before instrument() are found by the agent's one heap walk


def existing(agent: Host, engine: Engine) -> None:
    pool = engine.pool
    if isinstance(pool, QueuePool) and pool.checkedin() + pool.checkedout() == 0:
        # No connection open: maybe an engine disposed of and not yet collected (an app of an
        # earlier test). It takes its name at its next new connection, if it gets one.
        _watch(agent, engine, None)
    else:
        watch(agent, engine)


def start(agent: Host) -> Stop | None:
    return None


def pool_name(engine: Engine) -> str:
    logging_name = getattr(engine.pool, "_orig_logging_name", None)
    if logging_name:
        return str(logging_name)
    url = engine.url
    database = url.database
    if database and not url.host:  # SQLite & co: a file, not a server
        database = os.path.basename(database)
    return default_pool_name(url.host, url.port, database)


def _read_gauges(engine_ref: weakref.ref[Engine]) -> PoolGauges | None:
    engine = engine_ref()
    if engine is None:
        return None
    pool = engine.pool
    if isinstance(pool, QueuePool):
        size = pool.size()
        max_overflow = getattr(pool, "_max_overflow", -1)
        return PoolGauges(
            used=pool.checkedout(),
            idle=pool.checkedin(),
            idle_max=size,
            idle_min=0,
            max=size + max_overflow if max_overflow >= 0 else None,
            overflow=max(pool.overflow(), 0),
        )
    return PoolGauges(used=None, idle=0)  # NullPool, StaticPool...: poolwatch counts used itself


def watch(agent: Host, engine: Any, name: str | None = None) -> PoolStats:
    """Measure ``engine`` (an ``Engine`` or ``AsyncEngine``); idempotent, ``name`` renames."""
    stats = _watch(agent, engine, name)
    stats.attach(agent.registry)
    return stats


def _watch(agent: Host, engine: Any, name: str | None) -> PoolStats:
    """The engine's stats, made and hooked if new; it holds a name once attached."""
    engine = getattr(engine, "sync_engine", engine)
    stats: PoolStats | None = getattr(engine.pool, ATTR, None)
    if stats is not None:
        if name and name != stats.wanted:
            stats.rename(name)
        return stats

    def collected(_: object) -> None:  # the engine was garbage collected: its name is free
        if stats is not None:
            stats.detach()

    engine_ref = weakref.ref(engine, collected)
    stats = PoolStats(
        PROBE,
        name or pool_name(engine),
        lambda: _read_gauges(engine_ref),
        invalidations=True,
        track_leaks=leak_detection(agent),
    )
    setattr(engine.pool, ATTR, stats)
    _listen(agent, engine, stats)
    return stats


def _listen(agent: Host, engine: Engine, stats: PoolStats) -> None:
    registry = agent.registry
    connect_started: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def guarded(fn: Any) -> Any:
        def listener(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                errors.record(PROBE, exc)

        return listener

    def do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        if record is not None:
            connect_started[record] = perf_counter()

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        if stats.registry is None:  # used again after dispose(): hold a name again
            stats.attach(registry)
        start = connect_started.pop(record, None)
        if start is not None:
            stats.created(perf_counter() - start)

    listeners = {
        "detach": guarded(lambda dbapi_connection, record: stats.forget(id(record))),
        "invalidate": guarded(lambda dbapi_connection, record, exc: stats.invalidated(False)),
        "soft_invalidate": guarded(lambda dbapi_connection, record, exc: stats.invalidated(True)),
        "connect": guarded(on_connect),
    }
    # engine-level: do_connect returns None, so SQLAlchemy then connects as usual
    engine_listeners = {"do_connect": guarded(do_connect)}

    for identifier, fn in listeners.items():
        event.listen(engine.pool, identifier, fn)
    for identifier, fn in engine_listeners.items():
        event.listen(engine, identifier, fn)

    engine_ref = weakref.ref(engine)

    def undo() -> None:
        engine = engine_ref()
        if engine is None:
            return
        for identifier, fn in listeners.items():
            if event.contains(engine.pool, identifier, fn):
                event.remove(engine.pool, identifier, fn)
        for identifier, fn in engine_listeners.items():
            if event.contains(engine, identifier, fn):
                event.remove(engine, identifier, fn)
        if getattr(engine.pool, ATTR, None) is stats:
            delattr(engine.pool, ATTR)

    agent.add_undo(undo)
