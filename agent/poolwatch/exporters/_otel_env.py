"""The standard ``OTEL_*`` variables poolwatch honours: when OTLP export and tracing are on, and
a start-up check of the values the OpenTelemetry SDK would otherwise only warn about.

No OpenTelemetry import here: this decides whether the ``[otel]`` extra is needed at all.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError, Settings

ENDPOINTS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL = "pip install 'poolwatch[otel]'"


def _names(environ: Mapping[str, str], variable: str) -> set[str]:
    return {n.strip().lower() for n in environ.get(variable, "").split(",") if n.strip()}


def sdk_disabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """``otlp=True``/``POOLWATCH_OTLP``, ``OTEL_METRICS_EXPORTER`` naming ``otlp``, or (with that
    variable unset) an OTLP endpoint variable. ``OTEL_METRICS_EXPORTER=none`` or
    ``OTEL_SDK_DISABLED=true`` keep it off."""
    environ = os.environ if environ is None else environ
    if sdk_disabled(environ):
        return False
    if settings.otlp:
        return True
    exporters = _names(environ, "OTEL_METRICS_EXPORTER")
    if exporters:
        return "otlp" in exporters
    return any(environ.get(name) for name in ENDPOINTS)


def tracing_wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """``tracing=True``/``POOLWATCH_TRACING=true``, or, with it unset, ``OTEL_TRACES_EXPORTER`` set
    to an exporter. ``POOLWATCH_TRACING=false`` always wins."""
    environ = os.environ if environ is None else environ
    if sdk_disabled(environ) or settings.tracing is False:
        return False
    return settings.tracing or bool(_names(environ, "OTEL_TRACES_EXPORTER") - {"none"})


PROTOCOLS = ("http/protobuf", "grpc")  # what the SDK's OTLP exporters speak (no http/json)
# gRPC target names besides host[:port]: dns:[//authority/]host[:port], unix:path, ipv4:, ipv6:...
_GRPC_TARGET = re.compile(
    r"^((dns|unix|unix-abstract|ipv4|ipv6|vsock):\S+|[^\s/:]+(:\d+)?|\[[0-9a-fA-F:.]+\](:\d+)?)$"
)


def protocol(signal: str, environ: Mapping[str, str] | None = None) -> str:
    """The OTLP protocol of ``signal`` (METRICS or TRACES): the signal's own variable, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``, else http/protobuf (the specification's default; the
    ``opentelemetry-instrument`` distro sets grpc)."""
    environ = os.environ if environ is None else environ
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if environ.get(name, "").strip():
            return environ[name].strip()
    return "http/protobuf"


def check(signal: str, environ: Mapping[str, str] | None = None) -> None:
    """Fail at start-up, one line naming the variable, for a value the SDK would ignore with a
    warning (and export nowhere, or every 60 s instead of what was asked). ``signal``: METRICS
    or TRACES."""
    environ = os.environ if environ is None else environ
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name)
        if value and value.strip():
            if value.strip() not in PROTOCOLS:
                raise ConfigError(
                    f"{name}={value!r} is not supported: expected grpc (port 4317) or "
                    "http/protobuf (port 4318). Fix or unset it."
                )
            break
    grpc = protocol(signal, environ) == "grpc"
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name)
        if value:
            parts = urlsplit(value)
            if parts.scheme in ("http", "https"):
                valid = bool(parts.hostname)
            else:  # the gRPC exporter also takes a gRPC target: host:port, dns:///host:port...
                valid = grpc and bool(_GRPC_TARGET.match(value))
            if not valid:
                example = "otel-collector:4317" if grpc else "http://otel-collector:4318"
                raise ConfigError(
                    f"{name}={value!r} is invalid: expected an http:// or https:// URL"
                    f"{' or a gRPC target' if grpc else ''}, e.g. {example}. Fix or unset it."
                )
            break
    timeouts = [f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
    if signal == "METRICS":
        timeouts += ["OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT"]
    for name in timeouts:
        value = environ.get(name)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (number > 0 and math.isfinite(number)):
            unit = "seconds" if name.startswith("OTEL_EXPORTER") else "milliseconds"
            raise ConfigError(
                f"{name}={value!r} is invalid: expected a number of {unit} > 0. Fix or unset it."
            )


def app_meter_provider() -> Any:
    """The app's global OpenTelemetry SDK ``MeterProvider`` (set by the distro or the app), or
    None. Imports nothing: without the SDK imported, none can be set."""
    if "opentelemetry.sdk.metrics" not in sys.modules or sdk_disabled():
        return None
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    provider = metrics.get_meter_provider()
    return provider if isinstance(provider, MeterProvider) else None


def otel_http_instrumentation(app: Any, signal: str = "metrics") -> str | None:
    """What of OpenTelemetry already makes ``app``'s server spans (``signal="traces"``) or
    records its ``http.server.*`` metrics (``"metrics"``), for a log line; None if nothing:

    - the FastAPI (or Starlette) instrumentation: the distro patches the class, or
      ``instrument_app()``; both set ``_is_instrumented_by_opentelemetry``;
    - FastAPI's own OpenTelemetry support (``FastAPI(telemetry=...)``, on by default where the
      ``opentelemetry`` API is installed: it records once a provider is set);
    - an ``OpenTelemetryMiddleware`` among the app's middleware, or wrapping the app.
    """
    if getattr(app, "_is_instrumented_by_opentelemetry", False) is True:
        kind = "FastAPI" if "fastapi" in type(app).__module__ else type(app).__name__
        return f"OpenTelemetry's {kind} instrumentation"
    native = getattr(app, "_telemetry", None)  # private to FastAPI: read, never written
    wanted = "tracing" if signal == "traces" else "metrics"
    if hasattr(app, "_native_telemetry") and isinstance(native, dict) and native.get(wanted):
        return "FastAPI's own OpenTelemetry telemetry"
    asgi = sys.modules.get("opentelemetry.instrumentation.asgi")
    if asgi is None:  # not imported: no OpenTelemetryMiddleware can be in use
        return None
    middleware = asgi.OpenTelemetryMiddleware
    for entry in getattr(app, "user_middleware", None) or ():
        cls = getattr(entry, "cls", None)
        if isinstance(cls, type) and issubclass(cls, middleware):
            return "OpenTelemetry's ASGI middleware (in app.user_middleware)"
    for _ in range(32):  # an ASGI app wrapped in middleware objects, each holding .app
        if isinstance(app, middleware) and type(app).__module__ == middleware.__module__:
            return "OpenTelemetry's ASGI middleware (wrapping the app)"
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def export_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds one OTLP/HTTP metrics export may take (the SDK's own setting, default 10)."""
    environ = os.environ if environ is None else environ
    for name in ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if environ.get(name):
            return float(environ[name])
    return 10.0
