"""Diagnosis: the guide's anti-patterns caught at runtime (docs/diagnosis.md).

Each finding is counted in ``poolwatch_antipatterns_total{kind, culprit}`` (``culprit``: the
application's ``module:function``, capped at ``max_culprits``, the rest ``other``) and logged once
per place as one line naming the app's code (``file:line``) and the fix. Never a SQL parameter:
a statement is shown only normalized (its literals replaced by ``?``).

Where each detector hooks, and what it costs (bench/bench_diagnosis.py):

- ``engine_per_request``, ``client_per_request``, ``unclosed_pool``: the constructors of
  SQLAlchemy's ``Engine``, asyncpg's ``Pool``, aiohttp's ``ClientSession`` and httpx's
  ``AsyncClient`` (rare calls), and the lifespan's end (``shutdown_done``). A request is "being
  served" when ``context.request_scope`` is set: the middleware sets it while diagnosis is on.
- ``n_plus_one`` and the queries-per-request histogram: one dict update per statement, in the
  request's ASGI scope (``Connection._exec_single_context`` for SQLAlchemy,
  ``Connection._execute`` for raw asyncpg: ``fetch*()``, ``execute()`` with arguments); the
  histogram is fed once per request that ran a query.
- ``sync_db_on_loop``: the same SQLAlchemy hook, for a dialect that is not async, on a thread
  running an event loop, once the app serves.
- ``shared_async_session``: ``AsyncSession``'s async methods note the task using the session.
- ``swallowed_cancel`` (off by default: a task factory costs every task): a task that was
  cancelled, returned normally and still counts as cancelling (``Task.cancelling() > 0``):
  ``asyncio.timeout`` and ``TaskGroup`` call ``uncancel()`` as designed, so they never show.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NamedTuple

from .._histogram import Histogram
from .._imports import after_import
from .._log import errors, logger
from .._patching import Hooks as LateHooks
from .._types import Hooks, Host, Stop
from ..context import QUERIES, request_scope, route_template
from ..metrics import ANTIPATTERNS, BUCKETS, REQUEST_QUERIES, HistogramValue, Point
from . import PROBES, installed, within
from ._culprit import APP, app_packages, code_kind
from ._pool_stats import default_pool_name

PROBE = "diagnosis"
WATCHES = None  # objects made before instrument() are not diagnosed (their creation is past)
FLAGGED = "poolwatch.n_plus_one"  # set in the scope once the request was flagged
OTHER = "other"
MAX_PLACES = 1000  # places remembered for "logged once" (memory stays bounded)
HTTPX = ">=0.23"

WHY = {
    "engine_per_request": (
        "a database engine or pool created while a request is served",
        "create the engine/pool once in the app's lifespan and share it (app.state)",
    ),
    "client_per_request": (
        "an HTTP client session created while a request is served",
        "create one aiohttp.ClientSession/httpx.AsyncClient in the lifespan and reuse it",
    ),
    "sync_db_on_loop": (
        "a synchronous database query run on the event loop's thread (it blocks the loop)",
        "use the async engine (create_async_engine, AsyncSession) or a sync endpoint (def)",
    ),
    "n_plus_one": (
        "the same statement run {n} times in one request (N+1 queries)",
        "load the related rows in one query (selectinload/joinedload, or WHERE id IN (...))",
    ),
    "shared_async_session": (
        "one AsyncSession used by two tasks at once",
        "give each task its own session (async_sessionmaker), never gather() on one session",
    ),
    "swallowed_cancel": (
        "a task was cancelled but returned normally (CancelledError swallowed)",
        "re-raise CancelledError after cleanup (except CancelledError: ...; raise)",
    ),
    "unclosed_pool": (
        "{what} still open when the app's lifespan shutdown finished",
        "close it in the lifespan's shutdown (await engine.dispose(), pool.close(), "
        "session.close())",
    ),
}


class Where(NamedTuple):
    culprit: str  # module:function (the label)
    place: str  # file:line (the log line)


_UNKNOWN = Where("unknown", "unknown")


def locate(frame: FrameType | None, packages: frozenset[str]) -> Where:
    """The innermost application frame of the stack (the culprit rule of ``_culprit``)."""
    depth = 0
    while frame is not None and depth < 200:
        module = frame.f_globals.get("__name__", "")
        code = frame.f_code
        if code_kind(code.co_filename, module, packages) == APP:
            return Where(f"{module}:{code.co_qualname}", f"{code.co_filename}:{frame.f_lineno}")
        frame, depth = frame.f_back, depth + 1
    return _UNKNOWN


def endpoint_where(scope: dict[str, Any]) -> Where:
    """The route's endpoint function: where it is defined."""
    endpoint = scope.get("endpoint")
    code = getattr(endpoint, "__code__", None)
    if code is None:
        return _UNKNOWN
    module = getattr(endpoint, "__module__", "?")
    return Where(f"{module}:{code.co_qualname}", f"{code.co_filename}:{code.co_firstlineno}")


_LITERALS = re.compile(r"'(?:[^']|'')*'|\$\d+|%\(\w+\)s|%s|(?<![\w$])\d+(?:\.\d+)?\b|:\w+")
_LISTS = re.compile(r"\(\s*\?(?:\s*,\s*\?)*\s*\)")


def normalized(statement: str) -> str:
    """The statement's shape: every literal and placeholder is ``?``, lists are ``(?)``."""
    return " ".join(_LISTS.sub("(?)", _LITERALS.sub("?", statement)).split())


class Findings:
    """What the detectors found: a registry source, read at collect time."""

    probe = PROBE

    def __init__(self, agent: Host) -> None:
        settings = agent.settings
        assert settings is not None  # install() runs after configure()
        self.agent = agent
        self.on = settings.diagnose
        self.n = settings.n_plus_one
        self.max_culprits = settings.max_culprits
        self.max_routes = settings.max_routes
        self.packages = app_packages(agent.app_module)
        self.serving = False  # from the agent's start to its stop: the app serves
        self.counts: Counter[tuple[str, str]] = Counter({(k, ""): 0 for k in sorted(self.on)})
        self.queries: dict[str, Histogram] = {}  # route -> queries of requests that ran some
        self._zeros: dict[str, int] = {}  # route -> requests without a query (collect time)
        self._culprits: set[str] = set()
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        # open pools and sessions made since install(), for unclosed_pool: id -> where made
        self.engines: weakref.WeakKeyDictionary[Any, Where] = weakref.WeakKeyDictionary()
        self.clients: weakref.WeakKeyDictionary[Any, Where] = weakref.WeakKeyDictionary()
        self.asyncpg_pools: dict[int, Where] = {}  # asyncpg pools cannot be weakly referenced

    # --- a finding ----------------------------------------------------------------------------
    def flag(
        self, kind: str, where: Where, what: str | None = None, route: str | None = None
    ) -> None:
        with self._lock:
            culprit = where.culprit
            if culprit not in self._culprits:
                if len(self._culprits) >= self.max_culprits:
                    culprit = OTHER
                else:
                    self._culprits.add(culprit)
            self.counts[(kind, culprit)] += 1
            first = (kind, where.place) not in self._logged and len(self._logged) < MAX_PLACES
            self._logged.add((kind, where.place))
        if first:
            scope = request_scope.get()
            if route is None and scope is not None:  # in a request: name it
                route = f"{scope.get('method', '')} {self.route(scope)}"
            what = what or WHY[kind][0]
            shown = f" in {route}" if route else ""
            logger.warning(
                f"poolwatch: {kind}: {what} at {where.place}{shown}. Fix: {WHY[kind][1]}",
                antipattern=kind,
                code=where.culprit,
                where=where.place,
                **({"route": route} if route else {}),
            )

    def here(self, skip: int = 2, scope: dict[str, Any] | None = None) -> Where:
        """The app's code calling: this thread's stack; inside SQLAlchemy's greenlet (async
        engines), the stack of the greenlet that awaits it; else the route's endpoint."""
        where = locate(sys._getframe(skip), self.packages)
        greenlet = sys.modules.get("greenlet")
        if where is _UNKNOWN and greenlet is not None:
            parent = greenlet.getcurrent().parent
            if parent is not None:
                where = locate(parent.gr_frame, self.packages)
        if where is _UNKNOWN and scope is not None:
            where = endpoint_where(scope)
        return where

    # --- per request --------------------------------------------------------------------------
    def route(self, scope: dict[str, Any]) -> str:
        server = self.agent.http_server
        if server is not None:
            return server.route_label(scope)
        template = route_template(scope) or "_UNMATCHED"
        if template not in self.queries and len(self.queries) >= self.max_routes:
            return "_OTHER"
        return template

    def finished(self, scope: dict[str, Any]) -> None:
        """A request that ran queries ended: its count into the histogram; N+1 of statements
        that differ only by their literals (the exact repeats were flagged as they ran).
        Requests without a query cost nothing here: they are the HTTP server probe's request
        count less these, added at collect time (``points``)."""
        try:
            counts: dict[str, int] | None = scope.get(QUERIES)
            total = sum(counts.values()) if counts else 0
            route = self.route(scope)
            histogram = self.queries.get(route)
            if histogram is None:
                with self._lock:
                    histogram = self.queries.setdefault(route, Histogram())
            histogram.observe(total)
            if counts and total >= self.n and FLAGGED not in scope and "n_plus_one" in self.on:
                shapes: Counter[str] = Counter()
                for statement, times in counts.items():
                    shapes[normalized(statement)] += times
                shape, times = shapes.most_common(1)[0]
                if times >= self.n:
                    self._n_plus_one(shape, times, endpoint_where(scope), scope)
        except Exception as exc:
            errors.record(PROBE, exc)

    def _n_plus_one(self, shape: str, times: int, where: Where, scope: dict[str, Any]) -> None:
        scope[FLAGGED] = True
        method = scope.get("method", "")
        what = WHY["n_plus_one"][0].format(n=f"{times}+" if times == self.n else times)
        self.flag("n_plus_one", where, f"{what}: {shape[:160]}", f"{method} {self.route(scope)}")

    def query(self, statement: str) -> None:
        """One statement run: counted in the request being served, if any."""
        scope = request_scope.get()
        if scope is None:
            return
        counts: dict[str, int] | None = scope.get(QUERIES)
        if counts is None:
            counts = scope[QUERIES] = {}
        times = counts.get(statement, 0) + 1
        counts[statement] = times
        if times == self.n and FLAGGED not in scope and "n_plus_one" in self.on:
            self._n_plus_one(normalized(statement), times, self.here(3, scope), scope)

    # --- at the lifespan's end ----------------------------------------------------------------
    def shutdown_done(self) -> None:
        """The app's lifespan shutdown finished: what it left open."""
        if "unclosed_pool" not in self.on:
            return
        try:
            left: list[tuple[str, Where]] = []
            for engine, where in list(self.engines.items()):
                pool = getattr(engine, "pool", None)
                checkedin = getattr(pool, "checkedin", None)
                checkedout = getattr(pool, "checkedout", None)
                if checkedin and checkedout and checkedin() + checkedout() > 0:  # still connected
                    url = engine.url  # host, port and database only: never user or password
                    name = default_pool_name(url.host, url.port, url.database)
                    left.append((f"SQLAlchemy engine {name}", where))
            for client, where in list(self.clients.items()):
                closed = getattr(client, "closed", None)
                if closed is None:
                    closed = getattr(client, "is_closed", True)
                if not closed:
                    left.append((f"{type(client).__module__}.{type(client).__qualname__}", where))
            for where in list(self.asyncpg_pools.values()):
                left.append(("asyncpg pool", where))
            for what, where in left:
                self.flag(
                    "unclosed_pool",
                    where,
                    f"{WHY['unclosed_pool'][0].format(what=what)}; it was created",
                )
        except Exception as exc:
            errors.record(PROBE, exc)

    # --- collect time -------------------------------------------------------------------------
    def alive(self) -> bool:
        return True

    def points(self) -> Iterator[Point]:
        with self._lock:
            counts = sorted(self.counts.items())
            queries = dict(self.queries)
        for (kind, culprit), count in counts:
            yield Point(ANTIPATTERNS, {"kind": kind, "culprit": culprit}, count)
        values = {route: histogram.value() for route, histogram in queries.items()}
        server = self.agent.http_server
        for route, requests in (server.requests_by_route() if server is not None else {}).items():
            # requests without a query: the route's requests less those counted here, kept
            # monotonic (a request between the two reads is counted once, a little early)
            value = values.get(route, HistogramValue((0,) * (len(BUCKETS) + 1), 0.0))
            zeros = max(requests - value.count, self._zeros.get(route, 0))
            self._zeros[route] = zeros
            first = value.counts[0] + zeros  # 0 queries: the first bucket
            values[route] = HistogramValue((first, *value.counts[1:]), value.total)
        for route, value in sorted(values.items()):
            yield Point(REQUEST_QUERIES, {"http.route": route}, value)


_findings: Findings | None = None


def findings() -> Findings | None:
    """The detectors of this process while installed."""
    return _findings


# --- creation hooks -------------------------------------------------------------------------
def _created(kind: str, obj: Any, table: str) -> None:
    """A pool, engine or client was made: per request is a mistake; remember where it was
    made for ``unclosed_pool``."""
    found = _findings
    if found is None:
        return
    try:
        where = found.here(3)
        if kind in found.on and request_scope.get() is not None:
            scope = request_scope.get() or {}
            route = f"{scope.get('method', '')} {found.route(scope)}"
            found.flag(kind, where, route=route)
        if "unclosed_pool" in found.on:
            if table == "asyncpg":
                found.asyncpg_pools[id(obj)] = where
            else:
                getattr(found, table)[obj] = where
    except Exception as exc:
        errors.record(PROBE, exc)


def _make_init(kind: str, table: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            _created(kind, self, table)

        return __init__

    return make


def _closed(pool: Any) -> None:
    found = _findings
    if found is not None:
        found.asyncpg_pools.pop(id(pool), None)


def _make_asyncpg_close(original: Callable[..., Any]) -> Callable[..., Any]:
    async def close(self: Any) -> None:
        try:
            await original(self)
        finally:
            _closed(self)

    return close


def _make_asyncpg_terminate(original: Callable[..., Any]) -> Callable[..., Any]:
    def terminate(self: Any) -> None:
        try:
            original(self)
        finally:
            _closed(self)

    return terminate


# --- per statement --------------------------------------------------------------------------
def _make_exec_single(original: Callable[..., Any]) -> Callable[..., Any]:
    def _exec_single_context(
        self: Any, dialect: Any, context: Any, statement: Any, parameters: Any
    ) -> Any:
        found = _findings
        if found is not None:
            try:
                if (
                    not dialect.is_async
                    and found.serving
                    and "sync_db_on_loop" in found.on
                    and asyncio._get_running_loop() is not None
                ):
                    found.flag("sync_db_on_loop", found.here(2))
                found.query(context.statement)
            except Exception as exc:
                errors.record(PROBE, exc)
        return original(self, dialect, context, statement, parameters)

    return _exec_single_context


def _make_asyncpg_execute_args(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        found = _findings
        if found is not None:
            try:
                found.query(query)
            except Exception as exc:
                errors.record(PROBE, exc)
        return await original(self, query, *args, **kwargs)

    return _execute


# --- AsyncSession: one task at a time -------------------------------------------------------
_busy: dict[int, Any] = {}  # id(session) -> the task using it
SESSION_METHODS = (
    "execute", "scalar", "scalars", "get", "get_one", "stream", "stream_scalars", "flush",
    "commit", "rollback", "refresh", "merge", "delete", "connection", "run_sync",
)  # fmt: skip


def _make_session_method(original: Callable[..., Any]) -> Callable[..., Any]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = id(self)
        task = asyncio.current_task()
        holder = _busy.get(key)
        if holder is None:
            _busy[key] = task
            try:
                return await original(self, *args, **kwargs)
            finally:
                if _busy.get(key) is task:
                    del _busy[key]
        if holder is not task and (found := _findings) is not None:
            try:
                found.flag("shared_async_session", found.here(2))
            except Exception as exc:
                errors.record(PROBE, exc)
        return await original(self, *args, **kwargs)

    return method


# --- tasks: swallowed cancellation ----------------------------------------------------------
class _Task(asyncio.Task):  # type: ignore[type-arg]
    """The loop's tasks while ``swallowed_cancel`` is on: ``cancel()`` notes the task."""

    _poolwatch_where: Where | None

    def cancel(self, msg: Any = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled and not hasattr(self, "_poolwatch_where"):
            try:
                self._poolwatch_where = _task_code(self)
                if self._poolwatch_where is not None:
                    self.add_done_callback(_check_cancel)
            except Exception as exc:
                errors.record(PROBE, exc)
        return cancelled


def _task_code(task: asyncio.Task[Any]) -> Where | None:
    """Where the task's coroutine is defined, if it is the application's."""
    found = _findings
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    code = getattr(coro, "cr_code", None)
    if found is None or frame is None or code is None:
        return None
    module = frame.f_globals.get("__name__", "")
    if code_kind(code.co_filename, module, found.packages) != APP:
        return None
    return Where(f"{module}:{code.co_qualname}", f"{code.co_filename}:{code.co_firstlineno}")


def _check_cancel(task: asyncio.Task[Any]) -> None:
    found = _findings
    try:
        if found is None or task.cancelled() or task.cancelling() == 0:
            return
        if task.exception() is None:  # returned normally although still cancelling
            where = getattr(task, "_poolwatch_where", None) or _UNKNOWN
            found.flag("swallowed_cancel", where)
    except Exception as exc:
        errors.record(PROBE, exc)


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    return _Task(coro, loop=loop, **kwargs)


# --- the probe contract (probes/__init__.py) ------------------------------------------------
def install(agent: Host, hooks: Hooks) -> None:
    global _findings
    settings = agent.settings
    if settings is None or not settings.diagnose:
        return
    found = Findings(agent)
    on = found.on
    creation = {"engine_per_request", "client_per_request", "unclosed_pool"} & on

    def hooked(library: str) -> bool:
        """A library's own probe off (outside its range, its hooks changed) leaves it as it
        is: the detectors do not hook it either."""
        return _has(library) and (library not in PROBES or agent.probe(library) is not None)

    def when_imported(library: str, place: Callable[[Hooks], None]) -> None:
        """Hook ``library`` now if the app has imported it, else the moment it does: the
        detectors never import a library for the app (``_imports``), as the probes do not."""
        if library in sys.modules:
            if hooked(library):
                place(hooks)
            return

        def imported() -> None:
            if agent.diagnosis is not found or not hooked(library):
                return  # uninstrumented since, or the library's own probe is off
            late = LateHooks(PROBE, library)
            try:
                place(late)
            except Exception as exc:
                late.undo()
                errors.record(PROBE, exc)
                return
            agent.add_undo(late.undo)

        hooks.on_undo(after_import(library, imported))

    when_imported("sqlalchemy", lambda h: _sqlalchemy(h, on, bool(creation)))
    when_imported("asyncpg", lambda h: _asyncpg(h, on, bool(creation)))
    if creation:
        when_imported("aiohttp", _aiohttp_sessions)
        version = installed("httpx")
        if version is not None and within(version, HTTPX):
            when_imported("httpx", _httpx_clients)
    _findings = found
    agent.diagnosis = found
    agent.registry.add(found)

    def undo() -> None:
        global _findings
        _findings = None
        _busy.clear()
        if agent.diagnosis is found:
            agent.diagnosis = None

    hooks.on_undo(undo)


def _has(library: str) -> bool:
    return installed(library) is not None


def _sqlalchemy(hooks: Hooks, on: frozenset[str], creation: bool) -> None:
    from sqlalchemy.engine import Connection, Engine

    if creation:
        make = _make_init("engine_per_request", "engines")
        hooks.feature(Engine, "__init__", make, "(self, ...)")
    if {"n_plus_one", "sync_db_on_loop"} & on:
        params = "(self, dialect, context, statement, parameters)"
        hooks.feature(Connection, "_exec_single_context", _make_exec_single, params)
    if "shared_async_session" in on:
        from sqlalchemy.ext.asyncio import AsyncSession

        for name in SESSION_METHODS:
            if name in vars(AsyncSession):
                hooks.feature(AsyncSession, name, _make_session_method, "async (self, ...)")


def _asyncpg(hooks: Hooks, on: frozenset[str], creation: bool) -> None:
    from asyncpg.connection import Connection
    from asyncpg.pool import Pool

    if creation:
        hooks.feature(Pool, "__init__", _make_init("engine_per_request", "asyncpg"), "(self, ...)")
        hooks.feature(Pool, "close", _make_asyncpg_close, "async (self)")
        hooks.feature(Pool, "terminate", _make_asyncpg_terminate, "(self)")
    if "n_plus_one" in on:
        params = "async (self, query, args, limit, timeout, ...)"
        # fetch*() and execute() with arguments; execute() without is asyncpg's own BEGIN,
        # ROLLBACK and pool reset (and SQLAlchemy's), which are no app queries
        hooks.feature(Connection, "_execute", _make_asyncpg_execute_args, params)


def _aiohttp_sessions(hooks: Hooks) -> None:
    import aiohttp

    make = _make_init("client_per_request", "clients")
    hooks.feature(aiohttp.ClientSession, "__init__", make, "(self, ...)")


def _httpx_clients(hooks: Hooks) -> None:
    import httpx

    make = _make_init("client_per_request", "clients")
    hooks.feature(httpx.AsyncClient, "__init__", make, "(self, ...)")


def existing(agent: Host, obj: object) -> None:
    return None


def watch(agent: Host, obj: object, name: str | None = None) -> None:
    raise TypeError("the diagnosis probe watches no objects: instrument(app) serves it")


def start(agent: Host) -> Stop | None:
    """The app serves from now on; ``swallowed_cancel`` sets the loop's task factory."""
    found = _findings
    if found is None:
        return None
    found.serving = True
    loop = None
    if "swallowed_cancel" in found.on:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started from sync code: no loop to watch
            loop = None
        if loop is not None and loop.get_task_factory() is not None:
            errors.degraded(
                PROBE,
                "poolwatch: swallowed_cancel is off: the loop has a task factory of its own; "
                "the other detectors run. Remove swallowed_cancel from POOLWATCH_DIAGNOSE.",
            )
            loop = None
        if loop is not None:
            loop.set_task_factory(_task_factory)

    def stop() -> None:
        found.serving = False
        if loop is not None and loop.get_task_factory() is _task_factory:
            loop.set_task_factory(None)

    return stop
