"""Tracing mode: OpenTelemetry's ASGI middleware for traces; poolwatch keeps the HTTP metrics.

``opentelemetry-instrumentation-asgi`` makes the server spans (and propagates context). Its own
HTTP metrics are sent to a no-op meter: poolwatch records ``http.server.*`` itself, so the series
keep their names and labels in either mode, never appear twice (at a collector that also gets
the app's global MeterProvider), and the SDK ``Histogram.record`` stays off the request path.

Where OpenTelemetry's own instrumentation already serves the app (the ``opentelemetry-instrument``
distro with the FastAPI instrumentation, ``instrument_app``, an ``OpenTelemetryMiddleware``), it
owns the server span: tracing mode adds nothing, and never renames that span (the FastAPI
instrumentation names it by route itself; two owners of one name would fight over it).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider

from .._log import logger
from .._types import HttpServer
from ..config import ConfigError
from ..metrics import HTTP_METHODS, HTTP_OTHER_METHOD
from ._otel_env import otel_http_instrumentation, protocol


def _span_details(scope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The span starts before routing: named by the method only (never the raw path, a label of
    unbounded cardinality); :func:`name_span` adds the route once it is known."""
    method = scope.get("method", "HTTP")
    return (method if method in HTTP_METHODS else "HTTP"), {}


def name_span(method: str, route: str) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(f"{'HTTP' if method == HTTP_OTHER_METHOD else method} {route}")
        span.set_attribute("http.route", route)


OPTIONS: dict[str, Any] = {
    "meter_provider": NoOpMeterProvider(),
    "default_span_details": _span_details,
    "exclude_spans": ["receive", "send"],  # one span per ASGI message: noise, and costly
}


class TracingLayer(OpenTelemetryMiddleware):
    """OpenTelemetry's ASGI middleware, unless a span is already current when a request gets
    here: then an outer layer (OpenTelemetry's own instrumentation wrapping the app) made the
    server span, and this one would only add an INTERNAL duplicate of it."""

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if trace.get_current_span() is not trace.INVALID_SPAN:
            await self.app(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def layer(app: Any, owner: Any = None) -> Any:
    """Tracing mode's middleware around ``app`` (outside poolwatch's, whose response start names
    the span, still open then). Starlette calls it when it builds the middleware stack, at the
    first request or lifespan: an OpenTelemetry instrumentation applied to ``owner`` after
    ``instrument()`` is seen too. Where one is active, no layer is added (one server span)."""
    who = otel_http_instrumentation(owner if owner is not None else app, "traces")
    if who is not None:
        logger.info(f"poolwatch: tracing mode adds no ASGI middleware: {who} makes the spans")
        return app
    return TracingLayer(app, **OPTIONS)


def install(stats: HttpServer | None) -> None:
    if stats is not None:
        stats.on_route = name_span


def start() -> None:
    """Give the app an SDK tracer provider if it has none yet (an app or ``opentelemetry-
    instrument`` that configured its own keeps it). Exporters from ``OTEL_TRACES_EXPORTER``:
    ``otlp`` (the default; over ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``), ``console``, ``none``;
    sampler from ``OTEL_TRACES_SAMPLER``. Set once per process; the SDK flushes it at exit."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    from .otlp import resource

    names = {n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    unknown = names - {"otlp", "console", "none", ""}
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(sorted(unknown))!r} is not supported by poolwatch's "
            "tracing mode: expected otlp, console or none (or configure your own TracerProvider)."
        )
    provider = TracerProvider(resource=resource())
    if "otlp" in names:
        if protocol("TRACES") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            exporter = HttpExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if "console" in names:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
