"""The agent: installs the probes, owns the registry of what is watched, runs the exporters.

One per process (``poolwatch.agent.agent``), driven by the public functions of
``poolwatch.agent``. Probes follow the contract of ``poolwatch/probes/__init__.py``: those whose
library is missing or outside its tested range are skipped, and a probe whose hook targets
changed is undone and left off, so the agent runs with none of sqlalchemy/asyncpg/aiohttp
present or hookable.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import itertools
import os
import sys
import threading
import weakref
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from ._imports import after_import
from ._log import errors, logger
from ._patching import Hooks, TargetChanged, subclasses
from ._registry import Registry
from ._types import Diagnosis, HttpServer, Probe, Stop, Undo
from .config import ConfigError, Settings, load_settings
from .probes import PROBES, installed, refusal

if TYPE_CHECKING:
    from .exporters.otlp import Joined
    from .exporters.prefork import SharedTarget


class StartupError(ConfigError):
    """With ``POOLWATCH_STRICT=true``: the environment kept a part of poolwatch off."""


class Unavailable(Exception):
    """The environment keeps one exporter off (a taken port, a missing extra...). The message is
    one line: what is off, and the fix."""

    def __init__(self, probe: str, message: str) -> None:
        super().__init__(message)
        self.probe = probe


class Agent:
    def __init__(self) -> None:
        self.registry = Registry()
        self.settings: Settings | None = None
        self.discovering = False  # True after instrument(): new engines/pools are watched
        self.started = False
        self._probes: dict[str, Probe | None] = {}
        self._off: dict[str, str] = {}  # probe -> why it is off (a version, a changed target)
        self._walked = False  # the heap was searched for pools made before instrument()
        self._waiting: set[str] = set()  # probes waiting for the app to import their library
        self._installing: set[str] = set()
        self._undos: list[Undo] = []
        self._stops: list[Stop] = []
        self._lock = threading.RLock()
        self.metrics_port: int | None = None  # the bound port, once listening
        self.metrics_off: str | None = None  # why this process's series are served nowhere
        self.worker: str | None = None  # the `worker` label, in a pre-fork server's worker
        self._shared: SharedTarget | None = None  # in a pre-fork server's worker
        self._registries: list[Any] = []  # the app's prometheus_client registries we are in
        self.port_explicit = False  # metrics_port/POOLWATCH_METRICS_PORT given at instrument()
        self._apps: list[weakref.ref[Any]] = []  # the apps instrument() was given
        self.joined: Joined | None = None  # the app's MeterProvider poolwatch is in
        self.http_server: HttpServer | None = None  # the HTTP server probe's request recorder
        self.diagnosis: Diagnosis | None = None  # the diagnosis probe's detectors
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

    def probe(self, name: str) -> Probe | None:
        """The probe module, its class-level hooks installed; None while it is off (its library
        missing, outside its tested range, or its hook targets changed)."""
        with self._lock:
            if name not in self._probes:
                if name in self._installing:
                    # asked again from inside its own install: importing the probe imported its
                    # library, whose wait (``_imports``) asks for the probe (httpx imports
                    # httpcore only when a client is made)
                    return None
                self._installing.add(name)
                try:
                    self._probes[name] = self._install(name)
                finally:
                    self._installing.discard(name)
            return self._probes[name]

    def _install(self, name: str) -> Probe | None:
        library, spec = PROBES[name]
        if library is not None and importlib.util.find_spec(library) is None:
            return None
        why, label = refusal(name), name
        if why is None:
            version = f"{library} {installed(library)}" if library is not None else None
            hooks = Hooks(label, version)
            try:
                # the import too: a release that moved a class the probe imports is a change
                module: ModuleType = importlib.import_module(f"{__package__}.probes.{name}")
                probe = cast(Probe, module)
                hooks.probe = label = probe.PROBE
                probe.install(self, hooks)
            except (TargetChanged, ImportError) as exc:
                hooks.undo()  # nothing of a half-installed probe stays in place
                why = (
                    f"poolwatch: the {name} probe is off: {exc}"
                    f"{f' in {version}' if version else ''}; the app runs unchanged, without "
                    f"its metrics. poolwatch supports {library}{spec or ''} as far as tested: "
                    "report this release."
                )
            except Exception as exc:  # a bug of the probe: the app must not pay for it
                hooks.undo()
                self._off[name] = f"the {name} probe failed to install"
                errors.record(label, exc)
                return None
            else:
                self._undos.extend(hooks.undos)
                return probe
        self._off[name] = why
        if self.settings is not None and self.settings.strict:
            raise StartupError(f"{why} (POOLWATCH_STRICT=true)")
        errors.degraded(label, why)
        return None

    def discover(self) -> None:
        """Hook creation of new pools, and watch the ones that exist already."""
        with self._lock:
            self.discovering = True
            for name, line in PROBES.items():
                if line.library is None or line.library in sys.modules or name in self._probes:
                    self.probe(name)
                elif name not in self._waiting:
                    # the app has not imported the library (yet): the probe loads if it does
                    self._waiting.add(name)
                    self._undos.append(after_import(line.library, partial(self._imported, name)))
            walk, self._walked = not self._walked, True
        if walk:
            self._watch_existing()

    def _imported(self, name: str) -> None:
        """The app imported a library whose probe waited: install it (no heap walk: no instance
        of the library's classes can be older than the library)."""
        with self._lock:
            self._waiting.discard(name)
            if not self.discovering:
                return
            try:
                module = self.probe(name)
                if module is not None and self.started:
                    stop = module.start(self)
                    if stop is not None:
                        self._stops.append(stop)
            except StartupError as exc:  # strict: said in its line; the import must not fail
                logger.error(str(exc))
            except Exception as exc:
                errors.record(name, exc)

    def _watch_existing(self) -> None:
        """Pools, engines and sessions made before the first ``instrument()``: one pass over the
        heap for every probe, once (until ``uninstrument()``); from then on the creation hooks
        see every new one. Objects are matched on their exact type, from the set of the watched
        classes and their subclasses: no attribute of an arbitrary object (a proxy's
        ``__class__``...) is read."""
        adopters: dict[type, Probe] = {}
        for module in self._probes.values():
            if module is not None and module.WATCHES is not None:
                watched = module.WATCHES  # a class, or a tuple of classes with no common base
                for base in watched if isinstance(watched, tuple) else (watched,):
                    for cls in subclasses(base):
                        adopters.setdefault(cls, module)
        if not adopters:
            return
        heap = gc.get_objects()
        # map/compress run in C: no bytecode per object (bench/bench_heap_walk.py)
        found = list(itertools.compress(heap, map(adopters.__contains__, map(type, heap))))
        del heap
        for obj in found:
            module = adopters[type(obj)]
            try:
                module.existing(self, obj)
            except Exception as exc:
                errors.record(module.PROBE, exc)

    # --- run --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the exporters (called from the app's lifespan, or on first request).

        What the environment refuses (a taken port, a collector's missing extra, an unwritable
        directory) turns that exporter off with one warning and a counted error, and the app
        serves on; with ``POOLWATCH_STRICT=true`` it raises :class:`StartupError` instead.
        """
        with self._lock:
            if self.started:
                return
            settings = self.settings or self.configure({})
            self.started = True
            # OTel first: joining the app's MeterProvider may put poolwatch's collector into the
            # registry of OpenTelemetry's Prometheus exporter (then no listener of its own)
            for start_exporter in (self._start_otel, self._start_listener):
                try:
                    start_exporter(settings)
                except Unavailable as exc:
                    if settings.strict:
                        self.started = False
                        self.stop()
                        raise StartupError(f"{exc} (POOLWATCH_STRICT=true)") from None
                    errors.degraded(exc.probe, str(exc))
            self._beside_otel_instrumentation()
            for module in list(self._probes.values()):
                if module is not None:
                    try:
                        stop = module.start(self)
                    except Exception as exc:  # a probe that cannot start leaves the app running
                        errors.record(module.PROBE, exc)
                        continue
                    if stop is not None:
                        self._stops.append(stop)
            where: dict[str, Any] = {"metrics": self.metrics_url or f"off: {self.metrics_off}"}
            if self._shared is not None:
                where.update(worker=self.worker, served_by=self.served_by or "none yet")
            logger.info("poolwatch started", **where, pid=os.getpid())

    @property
    def metrics_url(self) -> str | None:
        """Where this process's series are served on ``/metrics`` (None: nowhere). In a worker
        of a pre-fork server, the one target of all its workers, whichever worker serves it."""
        settings = self.settings
        if self._shared is not None:  # None while another program holds the port
            return None if self._shared.port_error else self._shared.url
        if self.metrics_port is None or settings is None:
            return None
        host = settings.metrics_addr
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.metrics_port}/metrics"

    @property
    def served_by(self) -> str | None:
        """In a pre-fork server's worker: the ``worker`` id of the worker serving the target."""
        shared = self._shared
        return shared.served_by() if shared is not None else None

    def _start_listener(self, settings: Settings) -> None:
        from .exporters.prefork import prefork_parent

        if settings.multiproc_dir:
            self.metrics_off = f"published to {settings.multiproc_dir} for `poolwatch exporter`"
            self._start_multiproc(settings)  # `poolwatch exporter` serves this worker
        elif settings.metrics_port == 0 or (self._registries and not self.port_explicit):
            self.metrics_off = "no listener (POOLWATCH_METRICS_PORT=0)"
            if self._registries:  # registry=, or OpenTelemetry's Prometheus exporter's
                self.metrics_off = "no listener; the series are in the app's own registry"
        elif (parent := prefork_parent()) is not None:
            self._start_prefork(settings, *parent)
        else:
            self._start_prometheus(settings)

    def _start_prefork(self, settings: Settings, server: str, parent: int) -> None:
        """A worker of a pre-fork server: one target for all its workers (exporters/prefork)."""
        from .exporters import prefork
        from .exporters.multiproc import WorkerIdInUse
        from .exporters.prometheus import PoolwatchCollector

        self.worker = worker = settings.worker or str(os.getpid())
        own = PoolwatchCollector(self.registry.collect, {"worker": worker})
        try:
            directory = prefork.directory_for(parent, settings.metrics_port)
            shared = prefork.join(server, directory, worker, own, settings)
        except WorkerIdInUse:
            self.metrics_off = f"POOLWATCH_WORKER={worker} is taken"
            raise Unavailable(
                "exporter",
                f"poolwatch: this {server} worker's series are not served: POOLWATCH_WORKER="
                f"{worker}: another live worker of this server has the same id. Unset "
                "POOLWATCH_WORKER (the default is the process id) or give each worker its own.",
            ) from None
        except OSError as exc:
            with contextlib.suppress(Unavailable):  # the worker holding the port serves itself
                self._start_prometheus(settings, {"worker": worker})
            where = f"{exc.filename}: " if exc.filename else ""  # no temporary directory: none
            if self.metrics_port is None:
                self.metrics_off = f"the workers cannot share a directory ({exc.strerror or exc})"
            raise Unavailable(
                "exporter",
                f"poolwatch: the {server} workers' metrics are not shared: {where}"
                f"{exc.strerror or exc}; /metrics shows only the worker that holds "
                f"POOLWATCH_METRICS_PORT={settings.metrics_port}. Set TMPDIR to a directory this "
                "user can write (and remove what is at that path if poolwatch did not make it), "
                "or set POOLWATCH_MULTIPROC_DIR and run `poolwatch exporter`.",
            ) from None
        self._shared = shared
        self._stops.append(shared.stop)
        if shared.port_error is not None:
            self.metrics_off = f"another program holds port {settings.metrics_port}"
            raise Unavailable("exporter", shared.port_taken_message())

    def _start_prometheus(self, settings: Settings, labels: dict[str, str] | None = None) -> None:
        from prometheus_client import CollectorRegistry

        from .exporters.prometheus import MetricsServer, PoolwatchCollector, metrics_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(PoolwatchCollector(self.registry.collect, labels))
        try:
            server = MetricsServer(
                metrics_app(registry, settings.metrics_token),
                settings.metrics_addr,
                settings.metrics_port,
            )
        except OSError as exc:
            where = f"{settings.metrics_addr}:{settings.metrics_port}"
            self.metrics_off = f"no listener on {where} ({exc.strerror or exc})"
            raise Unavailable(
                "exporter",
                f"poolwatch: no /metrics listener: POOLWATCH_METRICS_PORT={settings.metrics_port}: "
                f"cannot listen on {where} ({exc.strerror or exc}); the app serves on without "
                "it. Choose a free port, or set POOLWATCH_METRICS_PORT=0 to turn it off.",
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
            raise Unavailable(
                "exporter",
                f"poolwatch: not published: POOLWATCH_WORKER={worker}: another live process in "
                f"POOLWATCH_MULTIPROC_DIR={directory} publishes as this worker. Give each worker "
                "its own id, or unset POOLWATCH_WORKER (the default is the process id).",
            ) from None
        except OSError as exc:
            raise Unavailable(
                "exporter",
                f"poolwatch: not published: POOLWATCH_MULTIPROC_DIR={directory}: cannot write "
                f"there ({exc.strerror or exc}). Make it a directory this process can write (in "
                "Kubernetes, an emptyDir mounted in the app and the exporter containers), or "
                "unset POOLWATCH_MULTIPROC_DIR to serve /metrics from this process.",
            ) from None
        self._stops.append(publisher.stop)
        logger.info("poolwatch publishes for `poolwatch exporter`", path=publisher.path)

    def _start_otel(self, settings: Settings) -> None:
        """Metrics into the app's OpenTelemetry MeterProvider when it has one (the distro's, or
        one the app set before its start-up ended), else OTLP export through poolwatch's own
        when asked for (otel_env); tracing mode's tracer provider. The ``OTEL_*`` values were
        checked by ``instrument()``."""
        from .exporters import _otel_env as otel_env

        provider = otel_env.app_meter_provider()
        joined = provider is not None and self._join(provider, settings)
        if not joined and otel_env.otlp_wanted(settings):
            try:
                from .exporters import otlp

                stop = otlp.start(self.registry_collect)
            except ImportError as exc:
                raise Unavailable(
                    "otlp",
                    f"poolwatch: OTLP export is asked for but off ({exc.name or exc} is missing "
                    f"for OTEL_EXPORTER_OTLP_PROTOCOL={otel_env.protocol('METRICS')}): "
                    f"{otel_env.INSTALL}",
                ) from None
            self._stops.append(stop)
        if otel_env.tracing_wanted(settings):
            tracing = _tracing_mode(settings)
            if tracing is not None:
                tracing.start()

    def _join(self, provider: Any, settings: Settings) -> bool:
        """Put poolwatch's metrics into the app's ``provider``; False if its shape is unknown."""
        from .exporters import otlp

        try:
            joined = otlp.join(provider, self.registry_collect)
        except otlp.UnknownShape as exc:
            message = (
                f"poolwatch: not in the app's OpenTelemetry MeterProvider: its internals are "
                f"unknown ({exc}); poolwatch exports through a MeterProvider of its own when "
                "OTLP is asked for. Use an opentelemetry-sdk 1.x from 1.25 on."
            )
            if settings.strict:
                raise Unavailable("otlp", message) from None
            errors.degraded("otlp", message)
            return False
        self.joined = joined

        def leave() -> None:
            joined.close()
            self.joined = None

        self._stops.append(leave)
        for registry in joined.prometheus_registries:  # OpenTelemetry's Prometheus exporter
            self.add_registry(registry)
        logger.info("poolwatch's metrics join the app's MeterProvider", readers=joined.readers)
        return True

    def _beside_otel_instrumentation(self) -> None:
        """Where OpenTelemetry's HTTP instrumentation already serves the app, it owns the server
        span (never renamed by poolwatch) and, when its metrics go to an SDK MeterProvider,
        ``http.server.*``: poolwatch's own would record every request twice there."""
        from .exporters import _otel_env as otel_env

        stats = self.http_server
        apps = [app for ref in self._apps if (app := ref()) is not None]

        def instrumented(signal: str) -> str | None:
            return next(
                (w for app in apps if (w := otel_env.otel_http_instrumentation(app, signal))), None
            )

        if stats is None:
            return
        if instrumented("traces"):
            stats.on_route = None
        who = instrumented("metrics")
        recording = otel_env.app_meter_provider() is not None and (
            self.joined is None or self.joined.readers > 0
        )
        if who and recording:
            self.http_server = None
            self.registry.remove(stats)
            logger.info(
                f"poolwatch: http.server.* metrics step aside: {who} records them into the "
                "app's MeterProvider (one series per request, not two)"
            )

    def add_registry(self, registry: Any) -> None:
        """Put poolwatch's collector into the app's own ``prometheus_client`` registry."""
        from .exporters.prometheus import PoolwatchCollector

        if any(added is registry for added in self._registries):
            return  # instrument() again (an app built per test): registered already
        collector = PoolwatchCollector(self.registry_collect)
        try:
            registry.register(collector)
        except ValueError as exc:  # a name clash: the app's /metrics keeps what it had
            errors.degraded(
                "exporter",
                f"poolwatch: its series are not in the app's prometheus_client registry ({exc}); "
                "the app's /metrics is as it was. Rename the app's series of that name, or serve "
                "poolwatch's from its own listener (POOLWATCH_METRICS_PORT).",
            )
            return

        self._registries.append(registry)

        def undo() -> None:
            self._registries.remove(registry)
            with contextlib.suppress(KeyError):
                registry.unregister(collector)

        self._undos.append(undo)

    def registry_collect(self) -> Any:
        """The current registry's points (the registry object is replaced by uninstrument())."""
        return self.registry.collect()

    def stop(self) -> None:
        with self._lock:
            stops, self._stops = self._stops, []
            self.started = False
            self.metrics_port = None
            self.metrics_off = self.worker = self._shared = None
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
            self._walked = False
            self._waiting.clear()
            self._probes.clear()
            self._off.clear()
            self.settings = None
            self.app_module = None
            self._apps.clear()
            self.port_explicit = False
            self.http_server = None
            self.diagnosis = None
            self.registry = Registry()
        for undo in reversed(undos):
            try:
                undo()
            except Exception as exc:
                errors.record("exporter", exc)


def _tracing_mode(settings: Settings) -> Any:
    """The tracing module when tracing mode is on; None (and one warning) without its extra."""
    from .exporters._otel_env import INSTALL, tracing_wanted

    if not tracing_wanted(settings):
        return None
    try:
        from .exporters import tracing
    except ImportError:
        message = (
            "poolwatch: tracing mode is asked for (POOLWATCH_TRACING/OTEL_TRACES_EXPORTER) "
            f"but off: {INSTALL}"
        )
        if settings.strict:
            raise StartupError(message) from None
        errors.degraded("otlp", message)
        return None
    return tracing
