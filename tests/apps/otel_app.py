"""``http_app`` with OpenTelemetry set up in the app's own code (no distro), as ``OTEL_APP`` says:

- ``lifespan_provider``: the lifespan's start-up sets an SDK MeterProvider exporting OTLP over
  gRPC (to ``OTEL_EXPORTER_OTLP_ENDPOINT``), before poolwatch's agent starts;
- ``instrument_app``: that, plus ``FastAPIInstrumentor.instrument_app(app)`` called *after*
  poolwatch's ``instrument(app)``, and an SDK TracerProvider exporting spans over gRPC;
- ``asgi_middleware``: that, with ``OpenTelemetryMiddleware`` added by ``app.add_middleware``
  after ``instrument(app)`` instead of the FastAPI instrumentation.
"""

from __future__ import annotations

import contextlib
import os

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tests.apps.http_app import app

mode = os.environ["OTEL_APP"]
http_app_lifespan = app.router.lifespan_context
resource = Resource.create({"service.name": "otel-app"})


@contextlib.asynccontextmanager
async def lifespan(app):
    async with http_app_lifespan(app):
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader], resource=resource))
        yield


app.router.lifespan_context = lifespan
if mode != "lifespan_provider":
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
if mode == "instrument_app":
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app)
elif mode == "asgi_middleware":
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app.add_middleware(OpenTelemetryMiddleware)
