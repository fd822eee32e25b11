"""One pool-statistics model shared by the SQLAlchemy and asyncpg probes.

Only events are recorded on the hot path (waits, timeouts, checkout/return times); sizes are read
from the pool object itself at collect time, so they are right even when the agent attached to a
pool that was already busy.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from time import monotonic, perf_counter
from typing import Any, NamedTuple

from .._histogram import FOLD_AT, Histogram
from .._log import errors
from .._types import Sources
from ..metrics import (
    DB_COUNT,
    DB_CREATE_TIME,
    DB_DEMAND_PEAK,
    DB_IDLE_MAX,
    DB_IDLE_MIN,
    DB_MAX,
    DB_PENDING,
    DB_PENDING_PEAK,
    DB_TIMEOUTS,
    DB_USE_TIME,
    DB_USED_PEAK,
    DB_WAIT_TIME,
    LEAKS,
    PEAK_WINDOW,
    SA_INVALIDATIONS,
    SA_OVERFLOW,
    HistogramValue,
    Metric,
    Point,
)
from .leaks import HeldConnections

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


class PoolGauges(NamedTuple):
    used: (
        int | None
    )  # None: the pool cannot tell; poolwatch's own count of held connections is used
    idle: int | None  # None: this release keeps it where poolwatch cannot read it (left out)
    idle_max: int | None = None
    idle_min: int | None = None
    max: int | None = None
    overflow: int | None = None  # SQLAlchemy only


class PoolStats:
    """Counters of one pool.

    Thread-safe without a lock on the hot path (sync engines are used from many threads): every
    hot-path update is a single atomic C operation (dict set/pop, ``next()``, ``deque.append``).
    Rare events (timeouts, invalidations, new connections) take a lock.

    Its pool name is held while the pool is open (:meth:`attach`, :meth:`detach`): a name is
    free again the moment its pool closes, whether or not a scrape happens in between, so the
    same pool re-created gets the same name.
    """

    def __init__(
        self,
        probe: str,
        name: str,
        read_gauges: Callable[[], PoolGauges | None],
        *,
        invalidations: bool = False,
        track_leaks: bool = False,
        times_creates: bool = True,
        left_out: Callable[[], Collection[Metric]] | None = None,
    ) -> None:
        self.probe = probe
        self.wanted = self.name = name  # the name asked for; ``name`` is the one held
        self.registry: Sources | None = None  # while attached: collected, and holding ``name``
        self.read_gauges = read_gauges  # returns None once the pool is gone
        self.timeouts = 0
        self.leaks = 0
        self.wait_time = Histogram()
        self.use_time = Histogram()
        self.create_time = Histogram()
        self.times_creates = times_creates  # False: the probe cannot time new connections
        # the series another exporter already records for this pool (redis-py's own metrics)
        self.left_out = left_out
        self.invalidations = {"false": 0, "true": 0} if invalidations else None
        self.waiting: dict[int, float] = {}  # wait token -> start; len() is pending_requests
        self.held: dict[int, float] = {}  # checkout key -> perf_counter() at checkout
        if track_leaks:  # off: a plain dict, so the probes' hot path does no extra work
            self.held = HeldConnections(self)
        self.closed = False
        self.tokens = itertools.count()  # wait tokens: unique across threads
        # High-water marks: raised on the hot path (a compare, no lock: a racing update may lose
        # a peak that the other thread's value then nearly equals), rotated at collect time.
        self.peak_used = self.peak_pending = self.peak_demand = 0
        self._before: tuple[int, int, int] = (0, 0, 0)  # the peaks of the previous window
        self._rotated = monotonic()
        self._lock = threading.Lock()

    # --- open and close: rare ---------------------------------------------------------------
    def attach(self, registry: Sources) -> None:
        """Hold a name (``wanted``, else ``wanted#2``...) and be collected from now on."""
        with self._lock:
            if self.registry is not None:
                return
            self.registry = registry
            self.name = registry.claim_name(self.wanted)
        registry.add(self)

    def detach(self) -> None:
        """The pool closed: its name is free again and the registry holds nothing of it."""
        with self._lock:
            registry, self.registry = self.registry, None
        if registry is not None:
            registry.remove(self)

    def rename(self, wanted: str) -> None:
        registry = self.registry
        self.detach()
        self.wanted = wanted
        if registry is not None:
            self.attach(registry)

    # --- hot path ---------------------------------------------------------------------------
    def wait_begin(self) -> int:
        token = next(self.tokens)
        waiting = self.waiting
        waiting[token] = perf_counter()
        if len(waiting) > self.peak_pending:
            self.new_peak()
        return token

    def wait_end(self, token: int, key: int) -> None:
        """A checkout succeeded: ``key`` identifies the connection until it is returned."""
        now = perf_counter()
        self.wait_time.observe(now - self.waiting.pop(token))
        held = self.held
        held[key] = now
        if len(held) > self.peak_used:
            self.new_peak()

    def wait_failed(self, token: int, timed_out: bool) -> None:
        self.waiting.pop(token, None)
        if timed_out:
            self.timed_out()

    def timed_out(self) -> None:
        with self._lock:
            self.timeouts += 1

    def leaked(self) -> None:
        with self._lock:
            self.leaks += 1

    def returned(self, key: int) -> None:
        start = self.held.pop(key, None)
        if start is not None:
            self.use_time.observe(perf_counter() - start)

    def forget(self, key: int) -> None:
        """The connection left the pool for good (detached): no use time to record."""
        self.held.pop(key, None)

    def created(self, seconds: float) -> None:
        self.create_time.observe(seconds)

    def invalidated(self, soft: bool) -> None:
        if self.invalidations is not None:
            with self._lock:
                self.invalidations["true" if soft else "false"] += 1

    def new_peak(self) -> None:
        """Used or pending went over its peak (rare: the hot path only compares): both peaks and
        their sum at this moment, the demand."""
        used, pending = len(self.held), len(self.waiting)
        self.peak_used = max(self.peak_used, used)
        self.peak_pending = max(self.peak_pending, pending)
        self.peak_demand = max(self.peak_demand, used + pending)

    # --- collect time -----------------------------------------------------------------------
    def peaks(self, used: int, pending: int) -> tuple[int, int, int]:
        """Peak used, pending and used + pending over the last one to two windows of
        ``PEAK_WINDOW`` s.

        The window turns on time, never on a read: every reader (Prometheus, ``poolwatch
        advise``, ``top``) sees the same peak, none resets it for the others, and one that
        collects at least once per window sees every burst. ``used``/``pending`` are now's."""
        with self._lock:
            now = monotonic()
            live = (
                max(self.peak_used, used),
                max(self.peak_pending, pending),
                max(self.peak_demand, used + pending),
            )
            if now - self._rotated >= PEAK_WINDOW:
                self._before, self._rotated = live, now
                self.peak_used, self.peak_pending, self.peak_demand = used, pending, used + pending
            before = self._before
            return max(live[0], before[0]), max(live[1], before[1]), max(live[2], before[2])

    def alive(self) -> bool:
        return not self.closed and self.read_gauges() is not None

    def points(self) -> Iterator[Point]:
        gauges = self.read_gauges()
        if gauges is None:
            return
        pool = {POOL_NAME: self.name}
        skip = self.left_out() if self.left_out is not None else ()
        used = len(self.held) if gauges.used is None else gauges.used
        if DB_COUNT not in skip:
            if gauges.idle is not None:
                yield Point(DB_COUNT, {**pool, STATE: "idle"}, gauges.idle)
            yield Point(DB_COUNT, {**pool, STATE: "used"}, used)
        for metric, size in (
            (DB_IDLE_MAX, gauges.idle_max),
            (DB_IDLE_MIN, gauges.idle_min),
            (DB_MAX, gauges.max),
            (SA_OVERFLOW, gauges.overflow),
        ):
            if size is not None:
                yield Point(metric, pool, size)
        pending = len(self.waiting)
        peak_used, peak_pending, peak_demand = self.peaks(used, pending)
        yield Point(DB_USED_PEAK, pool, peak_used)
        yield Point(DB_PENDING_PEAK, pool, peak_pending)
        yield Point(DB_DEMAND_PEAK, pool, peak_demand)
        with self._lock:  # copy under the lock, yield outside it
            events: list[tuple[Metric, dict[str, str], float | HistogramValue]] = [
                (DB_PENDING, pool, pending),
                (DB_TIMEOUTS, pool, self.timeouts),
                (LEAKS, pool, self.leaks),
                (DB_WAIT_TIME, pool, self.wait_time.value()),
                (DB_USE_TIME, pool, self.use_time.value()),
            ]
            if self.times_creates:
                events.append((DB_CREATE_TIME, pool, self.create_time.value()))
            for soft, count in (self.invalidations or {}).items():
                events.append((SA_INVALIDATIONS, {**pool, "soft": soft}, count))
        for metric, attributes, value in events:
            if metric not in skip:
                yield Point(metric, attributes, value)


def default_pool_name(host: str | None, port: int | str | None, database: str | None) -> str:
    """semconv fallback ``server.address:server.port/db.namespace``; never user or password."""
    server = f"{host}:{port}" if host and port else (host or "")
    if server:
        return f"{server}/{database}" if database else server
    return database or "default"


# --- hooks shared by the probes of pools with a checkout and a return method (redis,
# psycopg_pool): the same exactness rules (pending exact under cancellation, CancelledError
# re-raised, a failure of poolwatch's own counted and never raised), for sync and async pools.
# PoolStats' hot-path methods are inlined here: each Python call saved is ~0.05 µs of the
# 2 µs per-checkout budget (bench/bench_other_pools.py).
Make = Callable[[Callable[..., Any]], Callable[..., Any]]


def checkout_hook(
    probe: str,
    watched: dict[int, PoolStats],
    timed_out: Callable[[BaseException], bool],
    *,
    is_async: bool,
    timeout_only: bool = False,
) -> Make:
    """A ``make`` for ``hooks.wrap`` around a pool's checkout method (``watched``: id(pool) ->
    its stats): wait time, pending requests, timeouts and the start of the use time of the
    connection it returns (keyed by ``id(connection)``: a pool's connections are reused
    objects, so keys stay bounded by its size). ``timeout_only``: the method is
    ``(self, timeout=None)`` (psycopg_pool's ``getconn``), passed on without packing arguments,
    which is measurably cheaper on the per-checkout path."""
    stats_of = watched.get

    def failed(stats: PoolStats, token: int, exc: BaseException) -> None:
        try:
            stats.wait_failed(token, timed_out(exc))
        except Exception as inner:
            errors.record(probe, inner)

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        if is_async and timeout_only:

            async def checkout_timeout(self: Any, timeout: float | None = None) -> Any:
                stats = stats_of(id(self))
                if stats is None:
                    return await original(self, timeout)
                token = next(stats.tokens)
                stats.waiting[token] = perf_counter()
                try:
                    connection = await original(self, timeout)
                except BaseException as exc:  # CancelledError too: pending stays exact
                    failed(stats, token, exc)
                    raise
                try:
                    now = perf_counter()
                    waits = stats.wait_time.new  # Histogram.observe, inlined
                    waits.append(now - stats.waiting.pop(token))
                    if len(waits) >= FOLD_AT:
                        stats.wait_time.fold()
                    stats.held[id(connection)] = now
                except Exception as exc:
                    errors.record(probe, exc)
                return connection

            return checkout_timeout

        if is_async:

            async def checkout_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                stats = stats_of(id(self))
                if stats is None:
                    return await original(self, *args, **kwargs)
                token = next(stats.tokens)
                stats.waiting[token] = perf_counter()
                try:
                    connection = await original(self, *args, **kwargs)
                except BaseException as exc:  # CancelledError too: pending stays exact
                    failed(stats, token, exc)
                    raise
                try:
                    now = perf_counter()
                    waits = stats.wait_time.new  # Histogram.observe, inlined
                    waits.append(now - stats.waiting.pop(token))
                    if len(waits) >= FOLD_AT:
                        stats.wait_time.fold()
                    stats.held[id(connection)] = now
                except Exception as exc:
                    errors.record(probe, exc)
                return connection

            return checkout_async

        def checkout(self: Any, *args: Any, **kwargs: Any) -> Any:
            stats = stats_of(id(self))
            if stats is None:
                return original(self, *args, **kwargs)
            token = next(stats.tokens)
            stats.waiting[token] = perf_counter()
            try:
                connection = original(self, *args, **kwargs)
            except BaseException as exc:
                failed(stats, token, exc)
                raise
            try:
                now = perf_counter()
                waits = stats.wait_time.new
                waits.append(now - stats.waiting.pop(token))
                if len(waits) >= FOLD_AT:
                    stats.wait_time.fold()
                stats.held[id(connection)] = now
            except Exception as exc:
                errors.record(probe, exc)
            return connection

        return checkout

    return make


def return_hook(
    probe: str, watched: dict[int, PoolStats], *, is_async: bool, param: str = "connection"
) -> Make:
    """A ``make`` for ``hooks.wrap`` around a pool's return method ``(self, <param>)`` (its
    parameter's own name, so that a call by keyword still works), sync or async alike: the use
    time is recorded before the pool takes the connection back, and the wrapper returns what
    the method returns (an async method's coroutine is handed back unawaited: no second
    coroutine frame on the per-checkout path)."""
    stats_of = watched.get

    def returned(pool: Any, connection: Any) -> None:
        stats = stats_of(id(pool))
        if stats is not None:
            try:
                start = stats.held.pop(id(connection), None)
                if start is not None:
                    uses = stats.use_time.new  # Histogram.observe, inlined
                    uses.append(perf_counter() - start)
                    if len(uses) >= FOLD_AT:
                        stats.use_time.fold()
            except Exception as exc:
                errors.record(probe, exc)

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def give_back(self: Any, connection: Any) -> Any:
            returned(self, connection)
            return original(self, connection)

        def give_back_conn(self: Any, conn: Any) -> Any:  # psycopg_pool's putconn(conn)
            returned(self, conn)
            return original(self, conn)

        wrapper = give_back_conn if param == "conn" else give_back
        return mark_async(wrapper) if is_async else wrapper

    return make


def mark_async(function: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function that returns a coroutine, marked as a coroutine function for
    ``inspect`` where Python can (3.12+), as the method it replaces was."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    return mark(function) if mark is not None else function


def watch_by_id(
    watched: dict[int, PoolStats],
    registry: Sources,
    pool: Any,
    name: str | None,
    new: Callable[[weakref.ref[Any]], PoolStats],
) -> PoolStats:
    """``watch()`` of a probe whose pools are looked up by ``id()`` (asyncpg, redis,
    psycopg_pool): the pool's stats, renamed if ``name`` is new; else ``new(ref)`` made,
    kept and attached. ``ref`` is a weak reference to the pool whose death drops its stats
    and frees its name."""
    key = id(pool)
    stats = watched.get(key)
    if stats is not None:
        if name and name != stats.wanted:
            stats.rename(name)
        return stats

    def gone(_: object) -> None:
        dropped = watched.pop(key, None)
        if dropped is not None:
            dropped.closed = True
            dropped.detach()

    stats = watched[key] = new(weakref.ref(pool, gone))
    stats.attach(registry)
    return stats
