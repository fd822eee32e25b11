"""The public entry points: ``instrument(app)``, ``uninstrument()``, the ``watch_*()``
functions, and ``agent``, the process's one :class:`~poolwatch._agent.Agent`.

``instrument(app)`` is idempotent and ``uninstrument()`` undoes every hook. Probes whose library
is not installed are skipped, so the agent runs with none of sqlalchemy/asyncpg/aiohttp present.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import weakref
from typing import Any

from ._agent import Agent, StartupError, Unavailable, _tracing_mode
from ._types import Stop
from .asgi import PoolwatchMiddleware
from .config import ConfigError, Settings

__all__ = [
    "Agent",
    "StartupError",
    "Unavailable",
    "agent",
    "instrument",
    "uninstrument",
    "watch_aiohttp_session",
    "watch_asyncpg_pool",
    "watch_engine",
    "watch_event_loop",
    "watch_httpx_client",
    "watch_psycopg_pool",
    "watch_redis_pool",
]

agent = Agent()


def instrument(app: Any = None, *, registry: Any = None, **options: Any) -> Any:
    """Measure every pool, connector and the event loop of this process; serve ``/metrics``.

    A Starlette/FastAPI app is instrumented in place and returned; any other ASGI callable is
    returned wrapped. ``instrument()`` with no app only installs the probes (start the exporters
    with the app's lifespan, or call ``poolwatch.agent.agent.start()``).

    ``registry``: a ``prometheus_client`` ``CollectorRegistry`` the app already exposes (e.g.
    ``prometheus_client.REGISTRY``); poolwatch's series are added to it, and its own listener
    stays off unless ``metrics_port``/``POOLWATCH_METRICS_PORT`` asks for it.

    Raises ``ConfigError`` (one line) for an invalid setting value and ``TypeError`` for an
    ``app`` that is no ASGI application; nothing else stops the app.
    """
    if app is not None:
        _check_asgi(app)
    explicit_port = "metrics_port" in options or "POOLWATCH_METRICS_PORT" in os.environ
    agent.port_explicit = agent.port_explicit or explicit_port
    if registry is not None and not explicit_port:
        options["metrics_port"] = 0  # the app's own /metrics shows poolwatch's series
    try:
        settings = agent.configure(options)
        _check_otel_values(settings)
    except ConfigError as exc:  # one line, no chain of poolwatch's internals
        _one_line_when_uncaught()
        raise ConfigError(str(exc)) from None
    agent.app_module = agent.app_module or _caller_module()
    agent.discover()
    if registry is not None:
        agent.add_registry(registry)
    if app is None:
        return None
    with contextlib.suppress(TypeError):  # an app that cannot be weakly referenced
        if not any(ref() is app for ref in agent._apps):
            agent._apps.append(weakref.ref(app))
    tracing = _tracing_mode(settings)
    if tracing is not None:
        tracing.install(agent.http_server)
    if hasattr(app, "add_middleware") and hasattr(app, "user_middleware"):
        added = {m.cls for m in app.user_middleware}
        if PoolwatchMiddleware not in added:
            app.add_middleware(PoolwatchMiddleware, agent=agent)
        if tracing is not None and tracing.layer not in added:
            app.add_middleware(tracing.layer, owner=app)  # outside poolwatch's
        return app
    if isinstance(app, PoolwatchMiddleware) or isinstance(
        getattr(app, "app", None), PoolwatchMiddleware
    ):
        return app  # instrumented already (in tracing mode, inside OpenTelemetry's middleware)
    wrapped = PoolwatchMiddleware(app, agent=agent)
    return tracing.layer(wrapped, owner=app) if tracing is not None else wrapped


def _check_asgi(app: Any) -> None:
    """Refuse, in one line, what no ASGI server could serve (instead of failing per request)."""
    needs = "an ASGI application (an async callable taking scope, receive, send)"
    if inspect.isclass(app):
        raise TypeError(
            f"instrument() needs {needs}, got the class {app.__qualname__}: pass an instance, "
            f"e.g. instrument({app.__qualname__}())"
        )
    if not callable(app):
        raise TypeError(f"instrument() needs {needs}, got {type(app).__name__} {app!r:.60}")
    try:
        parameters = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):  # a C callable without a signature: let it through
        return
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) == 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise TypeError(
            f"instrument() needs {needs}; {type(app).__name__} takes two arguments, like a WSGI "
            "application (environ, start_response). Serve it through an ASGI adapter such as "
            "a2wsgi's WSGIMiddleware, and instrument that."
        )


def _check_otel_values(settings: Settings) -> None:
    """Invalid ``OTEL_*`` values fail now, at ``instrument()``, rather than at the lifespan."""
    from .exporters import _otel_env as otel_env

    if otel_env.otlp_wanted(settings):
        otel_env.check("METRICS")
    if otel_env.tracing_wanted(settings):
        otel_env.check("TRACES")


def _one_line_when_uncaught() -> None:
    """A ``ConfigError`` nobody catches ends the process: print it as the one line it is,
    instead of under the server's 40-line import traceback. Other exceptions, and a
    ``ConfigError`` the app catches, are untouched."""
    previous = sys.excepthook
    if getattr(previous, "poolwatch_one_line", False):
        return

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if isinstance(exc, ConfigError):
            print(f"poolwatch: {exc}", file=sys.stderr)
        else:
            previous(kind, exc, tb)

    excepthook.poolwatch_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def uninstrument() -> None:
    """Undo every hook and stop the exporters; middleware already in an app passes through."""
    agent.uninstrument()


def _watch(probe_name: str, caller: str, obj: Any, name: str | None) -> Any:
    probe = agent.probe(probe_name)
    if probe is None and probe_name in agent._off:
        return obj  # an unsupported version: said once already; the app goes on unmeasured
    if probe is None:
        raise RuntimeError(f"{caller}() needs {probe_name}: pip install 'poolwatch[{probe_name}]'")
    probe.watch(agent, obj, name)
    return obj


def watch_engine(engine: Any, name: str | None = None) -> Any:
    """Measure one SQLAlchemy ``Engine``/``AsyncEngine`` (``name`` overrides the default)."""
    return _watch("sqlalchemy", "watch_engine", engine, name)


def watch_asyncpg_pool(pool: Any, name: str | None = None) -> Any:
    """Measure one ``asyncpg`` pool (``name`` overrides the default)."""
    return _watch("asyncpg", "watch_asyncpg_pool", pool, name)


def watch_aiohttp_session(session: Any, name: str | None = None) -> Any:
    """Measure one ``aiohttp.ClientSession`` (``name`` groups its series under that name)."""
    return _watch("aiohttp", "watch_aiohttp_session", session, name)


def watch_httpx_client(client: Any, name: str | None = None) -> Any:
    """Measure the pools of one ``httpx.AsyncClient``/``Client`` (its transport's and its
    mounts'); ``name`` groups their series under ``httpx_client_name``."""
    return _watch("httpx", "watch_httpx_client", client, name)


def watch_redis_pool(pool: Any, name: str | None = None) -> Any:
    """Measure one redis-py ``ConnectionPool`` (``client.connection_pool``); ``name`` overrides
    the default ``host:port/db``."""
    return _watch("redis", "watch_redis_pool", pool, name)


def watch_psycopg_pool(pool: Any, name: str | None = None) -> Any:
    """Measure one ``psycopg_pool`` pool (``name`` overrides the default)."""
    return _watch("psycopg_pool", "watch_psycopg_pool", pool, name)


def watch_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> Stop:
    """Measure lag, blocks and tasks of ``loop`` (default: the running loop) without
    ``instrument()``; returns a callable that stops it. The series are served by the agent's
    ``/metrics`` listener when it runs, or by ``PoolwatchCollector(agent.registry.collect)``."""
    agent.app_module = agent.app_module or _caller_module()
    probe = agent.probe("loop")
    assert probe is not None  # the standard library's: never off
    stop: Stop = probe.watch(agent, loop or asyncio.get_running_loop())
    return stop


def _caller_module() -> str | None:
    """The module that called the public function calling this one."""
    return sys._getframe(2).f_globals.get("__name__")
