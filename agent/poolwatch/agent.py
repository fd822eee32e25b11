"""The process-wide agent: installs probes, owns the registry and the exporters.

``instrument(app)`` is idempotent and ``uninstrument()`` undoes every hook. Probes whose library
is not installed are skipped, so the agent runs with none of sqlalchemy/asyncpg/aiohttp present.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .config import ConfigError, Settings, load_settings
from .log import errors, logger
from .patching import Undo
from .registry import Registry

# probe name -> (library it hooks, or None if it needs none; module inside poolwatch.probes).
# A probe module provides ``install(agent) -> list[Undo]`` (class-level hooks, at instrument()),
# optionally ``watch(agent, obj, name)`` / ``existing_*()`` for objects, and optionally
# ``start(agent) -> stop callable`` run when the agent starts (inside the app's running loop).
PROBE_MODULES: dict[str, tuple[str | None, str]] = {
    "sqlalchemy": ("sqlalchemy", "poolwatch.probes.sqlalchemy"),
    "asyncpg": ("asyncpg", "poolwatch.probes.asyncpg"),
    "leaks": (None, "poolwatch.leaks"),  # checker thread of POOLWATCH_LEAK_THRESHOLD
    "aiohttp": ("aiohttp", "poolwatch.probes.aiohttp"),
    "loop": (None, "poolwatch.probes.loop"),
    "http_server": (None, "poolwatch.probes.http_server"),
}


class StartupError(ConfigError):
    """The agent could not start with these settings (e.g. the metrics port is taken)."""


class Agent:
    def __init__(self) -> None:
        self.registry = Registry()
        self.settings: Settings | None = None
        self.discovering = False  # True after instrument(): new engines/pools are watched
        self.started = False
        self._probes: dict[str, Any] = {}
        self._undos: list[Undo] = []
        self._stops: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self.metrics_port: int | None = None  # the bound port, once listening
        # Module that called instrument(): its package is application code for loop culprits.
        self.app_module: str | None = None

    # --- set-up -----------------------------------------------------------------------------
    def configure(self, options: dict[str, Any]) -> Settings:
        settings = load_settings(options)
        with self._lock:
            if self.settings is not None and options and settings != self.settings:
                logger.warning("poolwatch is already instrumented; new options are ignored")
                return self.settings
            self.settings = self.settings or settings
            return self.settings

    def add_undo(self, undo: Undo) -> None:
        self._undos.append(undo)

    def probe(self, name: str) -> Any | None:
        """The probe module, its class-level hooks installed; None if the library is missing."""
        with self._lock:
            if name not in self._probes:
                library, module_name = PROBE_MODULES[name]
                if library is not None and importlib.util.find_spec(library) is None:
                    self._probes[name] = None
                else:
                    module = importlib.import_module(module_name)
                    self._undos.extend(module.install(self))
                    self._probes[name] = module
            return self._probes[name]

    def discover(self) -> None:
        """Hook creation of new pools, and watch the ones that exist already."""
        with self._lock:
            self.discovering = True
            for name in PROBE_MODULES:
                self.probe(name)
        if (sa := self._probes.get("sqlalchemy")) is not None:
            for engine in sa.existing_engines():
                sa.watch(self, engine)
        if (apg := self._probes.get("asyncpg")) is not None:
            for pool in apg.existing_pools():
                apg.watch(self, pool)
        if (aio := self._probes.get("aiohttp")) is not None:
            for session in aio.existing_sessions():
                aio.watch(self, session)

    # --- run --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the exporters (called from the app's lifespan, or on first request)."""
        with self._lock:
            if self.started:
                return
            settings = self.settings or self.configure({})
            if settings.multiproc_dir:
                self._start_multiproc(settings)  # `poolwatch exporter` serves this worker
            else:
                self._start_prometheus(settings)
            self._start_otel(settings)
            for name, module in list(self._probes.items()):
                if module is not None and hasattr(module, "start"):
                    try:
                        stop = module.start(self)
                    except Exception as exc:  # a probe that cannot start leaves the app running
                        errors.record(name, exc)
                        continue
                    if stop is not None:
                        self._stops.append(stop)
            self.started = True
            logger.info("poolwatch started", metrics_port=self.metrics_port, pid=os.getpid())

    def _start_prometheus(self, settings: Settings) -> None:
        if settings.metrics_port == 0:
            return
        from prometheus_client import CollectorRegistry

        from .exporters.prometheus import MetricsServer, PoolwatchCollector, metrics_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(PoolwatchCollector(self.registry.collect))
        try:
            server = MetricsServer(
                metrics_app(registry, settings.metrics_token),
                settings.metrics_addr,
                settings.metrics_port,
            )
        except OSError as exc:
            where = f"{settings.metrics_addr}:{settings.metrics_port}"
            raise StartupError(
                f"POOLWATCH_METRICS_PORT={settings.metrics_port}: cannot listen on {where} "
                f"({exc.strerror or exc}). Choose a free port, set POOLWATCH_METRICS_PORT=0 to "
                "turn the listener off, or with several workers set POOLWATCH_MULTIPROC_DIR "
                "and run `poolwatch exporter`."
            ) from None
        self.metrics_port = server.port
        self._stops.append(server.stop)

    def _start_multiproc(self, settings: Settings) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        from .exporters.multiproc import Publisher, WorkerIdInUse
        from .exporters.prometheus import PoolwatchCollector

        directory = settings.multiproc_dir or ""
        worker = settings.worker or str(os.getpid())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PoolwatchCollector(self.registry.collect, {"worker": worker}))
        try:
            publisher = Publisher(directory, worker, lambda: generate_latest(registry))
        except WorkerIdInUse:
            raise StartupError(
                f"POOLWATCH_WORKER={worker}: another live process in POOLWATCH_MULTIPROC_DIR="
                f"{directory} publishes as this worker. Give each worker its own id, or unset "
                "POOLWATCH_WORKER (the default is the process id)."
            ) from None
        except OSError as exc:
            raise StartupError(
                f"POOLWATCH_MULTIPROC_DIR={directory}: cannot write there "
                f"({exc.strerror or exc}). Make it a directory this process can write (in "
                "Kubernetes, an emptyDir mounted in the app and the exporter containers), or "
                "unset POOLWATCH_MULTIPROC_DIR to serve /metrics from this process."
            ) from None
        self._stops.append(publisher.stop)
        logger.info("poolwatch publishes for `poolwatch exporter`", path=publisher.path)

    def _start_otel(self, settings: Settings) -> None:
        """OTLP metrics export and tracing mode's tracer provider, when asked for (otel_env)."""
        from . import otel_env

        try:
            if otel_env.otlp_wanted(settings):
                otel_env.check("METRICS")
                try:
                    from .exporters import otlp
                except ImportError:
                    raise ConfigError(f"OTLP export is on: {otel_env.INSTALL}") from None
                self._stops.append(otlp.start(self.registry.collect))
            if otel_env.tracing_wanted(settings):
                otel_env.check("TRACES")
                _tracing_mode(settings).start()
        except ConfigError as exc:
            raise StartupError(str(exc)) from None

    def stop(self) -> None:
        with self._lock:
            stops, self._stops = self._stops, []
            self.started = False
            self.metrics_port = None
        for stop in reversed(stops):
            try:
                stop()
            except Exception as exc:
                errors.record("exporter", exc)

    def uninstrument(self) -> None:
        self.stop()
        with self._lock:
            undos, self._undos = self._undos, []
            self.discovering = False
            self._probes.clear()
            self.settings = None
            self.app_module = None
            self.registry = Registry()
        for undo in reversed(undos):
            try:
                undo()
            except Exception as exc:
                errors.record("exporter", exc)


agent = Agent()


def instrument(app: Any = None, **options: Any) -> Any:
    """Measure every pool, connector and the event loop of this process; serve ``/metrics``.

    A Starlette/FastAPI app is instrumented in place and returned; any other ASGI callable is
    returned wrapped. ``instrument()`` with no app only installs the probes (start the exporters
    with the app's lifespan, or call ``poolwatch.agent.agent.start()``).
    """
    from .asgi import PoolwatchMiddleware

    settings = agent.configure(options)
    agent.app_module = agent.app_module or _caller_module()
    agent.discover()
    if app is None:
        return None
    tracing = _tracing_mode(settings)
    if tracing is not None:
        from .probes import http_server

        tracing.install(http_server.stats)
    if hasattr(app, "add_middleware") and hasattr(app, "user_middleware"):
        added = {m.cls for m in app.user_middleware}
        if PoolwatchMiddleware not in added:
            app.add_middleware(PoolwatchMiddleware)
        if tracing is not None and tracing.MIDDLEWARE not in added:
            app.add_middleware(tracing.MIDDLEWARE, **tracing.OPTIONS)  # outside poolwatch's
        return app
    if isinstance(app, PoolwatchMiddleware) or isinstance(
        getattr(app, "app", None), PoolwatchMiddleware
    ):
        return app  # instrumented already (in tracing mode, inside OpenTelemetry's middleware)
    app = PoolwatchMiddleware(app)
    return tracing.wrap(app) if tracing is not None else app


def _tracing_mode(settings: Settings) -> Any:
    """The tracing module when tracing mode is on (clear error if its extra is missing)."""
    from .otel_env import INSTALL, tracing_wanted

    if not tracing_wanted(settings):
        return None
    try:
        from . import tracing
    except ImportError:
        raise ConfigError(
            f"tracing is on (POOLWATCH_TRACING/OTEL_TRACES_EXPORTER): {INSTALL}"
        ) from None
    return tracing


def uninstrument() -> None:
    """Undo every hook and stop the exporters; middleware already in an app passes through."""
    agent.uninstrument()


def _watch(probe_name: str, caller: str, obj: Any, name: str | None) -> Any:
    probe = agent.probe(probe_name)
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


def watch_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> Callable[[], None]:
    """Measure lag, blocks and tasks of ``loop`` (default: the running loop) without
    ``instrument()``; returns a callable that stops it. The series are served by the agent's
    ``/metrics`` listener when it runs, or by ``PoolwatchCollector(agent.registry.collect)``."""
    agent.app_module = agent.app_module or _caller_module()
    return agent.probe("loop").watch(agent, loop or asyncio.get_running_loop())


def _caller_module() -> str | None:
    """The module that called the public function calling this one."""
    return sys._getframe(2).f_globals.get("__name__")
