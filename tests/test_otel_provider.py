"""poolwatch and OpenTelemetry in process: the OTLP settings accept what the SDK's exporters
accept; joining an app's MeterProvider (each reader's temporality, leaving it as it was);
OpenTelemetry's Prometheus reader; an unknown SDK or a missing gRPC exporter degrading with one
warning; what counts as OpenTelemetry already serving the app. The real distro, servers and
receivers: test_otel_distro.py."""

from __future__ import annotations

import inspect
import sys

import pytest


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc "}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
            },
            None,
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "[::1]:4317"},
            None,
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "dns:///c:4317"},
            None,
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c"},
            None,
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://"},
            "OTEL_EXPORTER_OTLP_ENDPOINT='http://'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "a b:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT='a b:4317'",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "expected an http:// or https://"),
    ],
)
def test_otlp_settings_accept_what_the_exporters_accept(environ, error):
    from poolwatch.config import ConfigError
    from poolwatch.exporters._otel_env import check

    if error is None:
        check("METRICS", environ)
    else:
        with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("(", r"\(")):
            check("METRICS", environ)


def _collected(reader) -> dict:
    """scope name -> {metric name: Metric} of one collection of an InMemoryMetricReader."""
    data = reader.get_metrics_data()
    return {
        sm.scope.name: {m.name: m for m in sm.metrics}
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
    }


def test_joining_a_provider_in_the_readers_temporality_and_leaving_it(clean_agent, tmp_path):
    from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from sqlalchemy import create_engine, text

    import poolwatch
    from poolwatch.agent import agent
    from poolwatch.exporters import otlp

    delta = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
    cumulative_reader, delta_reader = InMemoryMetricReader(), InMemoryMetricReader(delta)
    provider = MeterProvider(metric_readers=[cumulative_reader, delta_reader])
    poolwatch.instrument(metrics_port=0)
    try:
        joined = otlp.join(provider, agent.registry_collect)
        engine = create_engine(f"sqlite:///{tmp_path}/j.db", pool_logging_name="joined")

        def checkouts(n: int) -> None:
            for _ in range(n):
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))

        def wait_count(reader) -> tuple[int, int]:
            metric = _collected(reader)["poolwatch"]["db.client.connection.wait_time"]
            # this engine's point: an engine of an earlier test in this process that the
            # garbage collector has not freed yet is found by instrument()'s heap walk too
            (point,) = [
                p
                for p in metric.data.data_points
                if p.attributes["db.client.connection.pool.name"] == "joined"
            ]
            return metric.data.aggregation_temporality, point.count

        checkouts(3)
        assert wait_count(cumulative_reader) == (AggregationTemporality.CUMULATIVE, 3)
        assert wait_count(delta_reader) == (AggregationTemporality.DELTA, 3)
        checkouts(2)
        assert wait_count(cumulative_reader) == (AggregationTemporality.CUMULATIVE, 5)
        assert wait_count(delta_reader) == (AggregationTemporality.DELTA, 2)
        build_info = _collected(cumulative_reader)["poolwatch"]["poolwatch.build_info"]
        assert build_info.data.data_points[0].attributes == {"version": poolwatch.__version__}

        joined.close()  # the readers are as they were
        assert "_receive_metrics" not in vars(cumulative_reader)
        checkouts(1)
        data = cumulative_reader.get_metrics_data()
        assert data is None or not any(
            m.name == "db.client.connection.wait_time"
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        )
        joined = otlp.join(provider, agent.registry_collect)  # joined again: build_info once
        build_info = _collected(cumulative_reader)["poolwatch"]["poolwatch.build_info"]
        assert len(build_info.data.data_points) == 1
        joined.close()
        engine.dispose()
    finally:
        poolwatch.uninstrument()
        provider.shutdown()


def test_opentelemetrys_prometheus_reader_gets_poolwatchs_collector_not_its_points():
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from poolwatch.agent import agent
    from poolwatch.exporters import otlp

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    provider.get_meter("app").create_counter("orders").add(2)
    joined = otlp.join(provider, agent.registry_collect)
    try:
        assert joined.prometheus_registries == [registry]
        text = generate_latest(registry).decode()
        assert "orders_total" in text and "poolwatch" not in text
    finally:
        joined.close()
        provider.shutdown()


def test_an_unknown_sdk_shape_degrades_with_one_warning(monkeypatch, capsys):
    from opentelemetry.sdk.metrics import MeterProvider

    from poolwatch._log import errors
    from poolwatch.agent import Agent
    from poolwatch.config import load_settings
    from poolwatch.exporters import otlp

    provider = MeterProvider()
    monkeypatch.delattr(provider, "_measurement_consumer")
    with pytest.raises(otlp.UnknownShape):
        otlp.join(provider, list)
    before = errors.counts["otlp"]
    agent = Agent()
    assert agent._join(provider, load_settings({}, environ={})) is False
    assert agent._join(provider, load_settings({}, environ={})) is False
    assert errors.counts["otlp"] == before + 2
    captured = capsys.readouterr()  # stdout too: the app may have configured structlog
    lines = [x for x in (captured.err + captured.out).splitlines() if "MeterProvider" in x]
    assert len(lines) == 1 and "internals are unknown" in lines[0]

    monkeypatch.setattr(otlp, "KNOWN_SDK", ((0, 1), (0, 2)))  # a version not checked
    with pytest.raises(otlp.UnknownShape):
        otlp.join(MeterProvider(), list)


def test_a_missing_grpc_exporter_degrades_with_one_warning(clean_agent, monkeypatch, capsys):
    import poolwatch
    from poolwatch._log import errors
    from poolwatch.agent import agent

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    before = errors.counts["otlp"]
    poolwatch.instrument(metrics_port=0, otlp=True)
    agent.start()  # serves on
    assert agent.started
    assert errors.counts["otlp"] == before + 1
    captured = capsys.readouterr()  # stdout too: the app may have configured structlog
    (line,) = [x for x in (captured.err + captured.out).splitlines() if "OTLP export" in x]
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in line and "pip install 'poolwatch[otel]'" in line


def test_what_counts_as_opentelemetry_already_serving_the_app():
    from fastapi import FastAPI
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from starlette.applications import Starlette

    from poolwatch.exporters import tracing
    from poolwatch.exporters._otel_env import otel_http_instrumentation as serving

    async def raw(scope, receive, send):
        pass

    assert serving(raw) is None
    assert serving(tracing.layer(raw)) is None  # poolwatch's own tracing layer is not one
    assert "wrapping the app" in serving(OpenTelemetryMiddleware(raw))
    starlette = Starlette()
    assert serving(starlette) is None
    starlette.add_middleware(OpenTelemetryMiddleware)
    assert "user_middleware" in serving(starlette)
    if "telemetry" in inspect.signature(FastAPI).parameters:  # FastAPI's own OpenTelemetry
        native = FastAPI()  # on by default
        assert "FastAPI's own" in serving(native, "metrics")
        assert "FastAPI's own" in serving(native, "traces")
        quiet = FastAPI(telemetry={"tracing": False})
        assert serving(quiet, "traces") is None and serving(quiet, "metrics")
    else:
        quiet = FastAPI()
        assert serving(quiet, "traces") is None
    FastAPIInstrumentor.instrument_app(quiet)
    try:
        assert serving(quiet, "traces") == "OpenTelemetry's FastAPI instrumentation"
    finally:
        FastAPIInstrumentor.uninstrument_app(quiet)
    assert serving(quiet, "traces") is None
