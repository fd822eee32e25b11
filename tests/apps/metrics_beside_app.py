"""``http_app`` serving a ``/metrics`` of its own, with poolwatch's series in that registry.

``METRICS_LIB`` picks what serves it: ``instrumentator`` (prometheus-fastapi-instrumentator),
``starlette_exporter``, ``make_asgi_app`` (prometheus_client's ASGI app), or ``otel_prometheus``
(OpenTelemetry's Prometheus exporter on an SDK MeterProvider the app sets, with the FastAPI
instrumentation). ``POOLWATCH_REGISTRY=default`` (the default) calls
``instrument(app, registry=prometheus_client.REGISTRY)``; ``none`` calls ``instrument(app)`` (with
``otel_prometheus``, poolwatch then finds the exporter's registry through the MeterProvider);
``off`` leaves poolwatch out (the same app without it).
``CLASH=1`` registers a gauge of poolwatch's name first. Run with ``TEST_APP_BARE=1`` so that
``pool_app`` does not instrument the app itself.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, Gauge, make_asgi_app

from poolwatch import instrument
from tests.apps.http_app import app

lib = os.environ["METRICS_LIB"]
if os.environ.get("CLASH") == "1":  # the app's own series of a poolwatch name
    Gauge("db_client_connection_max", "The app's own gauge of that name.").set(7)
if lib == "instrumentator":
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator().instrument(app).expose(app)
elif lib == "starlette_exporter":
    from starlette_exporter import PrometheusMiddleware, handle_metrics

    app.add_middleware(PrometheusMiddleware, group_paths=True)
    app.add_route("/metrics", handle_metrics)
elif lib == "make_asgi_app":
    app.mount("/metrics", make_asgi_app())
elif lib == "otel_prometheus":
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider

    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    FastAPIInstrumentor.instrument_app(app)
    app.mount("/metrics", make_asgi_app())
else:
    raise SystemExit(f"METRICS_LIB={lib!r}: unknown")

mode = os.environ.get("POOLWATCH_REGISTRY", "default")
if mode == "default":
    instrument(app, registry=REGISTRY)
elif mode == "none":
    instrument(app)
