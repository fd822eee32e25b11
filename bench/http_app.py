"""The app of ``bench_http``: FastAPI with a trivial route and a one-query route.

``BENCH_VARIANT`` picks the instrumentation, ``BENCH_DSN`` the PostgreSQL (SQLAlchemy async engine,
asyncpg driver). ``BENCH_OTLP`` is an OTLP/HTTP receiver for the variants that export.
"""

from __future__ import annotations

import contextlib
import os

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

VARIANT = os.environ.get("BENCH_VARIANT", "bare")
state: dict = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state["engine"] = create_async_engine(
        os.environ["BENCH_DSN"], pool_size=20, max_overflow=0, pool_timeout=10
    )
    yield
    await state["engine"].dispose()


async def trivial():
    return {"ok": True}


async def one_query(n: int):
    async with state["engine"].connect() as conn:
        return {
            "value": (await conn.execute(text("SELECT CAST(:n AS integer)"), {"n": n})).scalar()
        }


def _sdk_providers() -> None:
    """What an OpenTelemetry user configures: SDK tracer and meter providers exporting OTLP."""
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = os.environ["BENCH_OTLP"]
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    )
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"))
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def make_app(variant: str) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.get("/")(trivial)
    app.get("/query/{n}")(one_query)
    if variant.startswith("poolwatch"):
        from poolwatch import instrument

        # every probe on (the defaults); "+otlp" also pushes every metric each second,
        # "+tracing" adds OpenTelemetry's ASGI middleware with an SDK tracer exporting spans
        instrument(
            app,
            otlp=variant == "poolwatch+otlp",
            tracing=variant == "poolwatch+tracing",
            diagnose=variant != "poolwatch-diagnosis-off",  # off: the detectors' cost shows
        )
    elif variant == "prometheus-fastapi-instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app).expose(app)
    elif variant == "starlette-exporter":
        from starlette_exporter import PrometheusMiddleware, handle_metrics

        app.add_middleware(PrometheusMiddleware, group_paths=True)
        app.add_route("/metrics", handle_metrics)
    elif variant.startswith("otel-asgi"):
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        if variant == "otel-asgi+sdk":
            _sdk_providers()
        app.add_middleware(OpenTelemetryMiddleware)
    elif variant == "noop-middleware":  # control: the price of any pure ASGI middleware

        class Noop:
            def __init__(self, app):
                self.app = app

            async def __call__(self, scope, receive, send):
                await self.app(scope, receive, send)

        app.add_middleware(Noop)
    elif variant != "bare":
        raise SystemExit(f"unknown BENCH_VARIANT={variant!r}")
    return app


app = make_app(VARIANT)
