"""The standard ``OTEL_*`` variables poolwatch honours: when OTLP export and tracing are on, and
a start-up check of the values the OpenTelemetry SDK would otherwise only warn about.

No OpenTelemetry import here: this decides whether the ``[otel]`` extra is needed at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .config import ConfigError, Settings

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


def check(signal: str, environ: Mapping[str, str] | None = None) -> None:
    """Fail at start-up, one line naming the variable, for a value the SDK would ignore with a
    warning (and export nowhere, or every 60 s instead of what was asked). ``signal``: METRICS
    or TRACES."""
    environ = os.environ if environ is None else environ
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name)
        if value:
            if value.strip() != "http/protobuf":
                raise ConfigError(
                    f"{name}={value!r} is not supported: poolwatch exports OTLP over HTTP "
                    "(http/protobuf, port 4318). Set it to http/protobuf or unset it."
                )
            break
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name)
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"{name}={value!r} is invalid: expected an http:// or https:// URL, "
                    "e.g. http://otel-collector:4318. Fix or unset it."
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


def export_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds one OTLP/HTTP metrics export may take (the SDK's own setting, default 10)."""
    environ = os.environ if environ is None else environ
    for name in ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if environ.get(name):
            return float(environ[name])
    return 10.0
