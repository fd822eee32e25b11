"""poolwatch under OpenTelemetry: the ``opentelemetry-instrument`` distro with its defaults (OTLP
over gRPC, the FastAPI instrumentation), a MeterProvider the app sets itself, and OTLP over gRPC
when poolwatch makes the provider.

The app runs in real uvicorn on a real PostgreSQL; a real OTLP/gRPC receiver (grpcio and
``opentelemetry-proto``) gets what the SDK's exporters send. Each fault is compared with the
same app without poolwatch (``TEST_APP_BARE=1``). In process (the settings, joining a
provider, what degrades): test_otel_provider.py.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import time
import urllib.error

import pytest

from tests.support.net import free_port, get, wait_for
from tests.support.otlp import GrpcReceiver, attributes, instruments

APP = "tests.apps.http_app:app"
DISTRO = [os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")]
SERVER, INTERNAL = 2, 1  # SpanKind in opentelemetry-proto
DELTA = 1  # AggregationTemporality in opentelemetry-proto
PATHS = ["/users/1", "/sa/query", "/apg/query", "/users/2", "/nope"]


def distro_env(receiver: GrpcReceiver, postgres, **extra: str) -> dict[str, str]:
    """Only what points the distro at the receiver (its defaults otherwise: otlp exporters for
    traces, metrics and logs, over gRPC)."""
    return {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "ASYNCPG_DSN": postgres.dsn(),
        "OTEL_SERVICE_NAME": "shop-api",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


def status(url: str) -> int:
    try:
        get(url)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def requests_counted(export, name: str) -> int:
    """How many requests ``name`` (an HTTP duration histogram) counts in one export."""
    found = instruments(export).get(name)
    return sum(p.count for p in found[1].histogram.data_points) if found else 0


@pytest.mark.parametrize(
    ("semconv", "tracing", "duration"),
    [
        ("http", None, "http.server.request.duration"),  # the stable HTTP conventions
        ("", "false", "http.server.duration"),  # the instrumentation's default (old names)
    ],
    ids=["stable-semconv", "POOLWATCH_TRACING=false"],
)
def test_under_the_distro_one_provider_and_one_server_span(
    app_server, postgres, semconv, tracing, duration
):
    extra = {"OTEL_SEMCONV_STABILITY_OPT_IN": semconv}
    if tracing is not None:
        extra["POOLWATCH_TRACING"] = tracing
    with GrpcReceiver() as receiver:
        server = app_server(APP, distro_env(receiver, postgres, **extra), prefix=DISTRO)
        statuses = [status(server.url + path) for path in PATHS * 4]
        assert statuses == [200, 200, 200, 200, 404] * 4  # the app started, and serves
        sent = time.monotonic()
        export = wait_for(
            lambda: next(
                (
                    body
                    for at, body in list(receiver.metrics)
                    if at > sent and requests_counted(body, duration) == 20
                ),
                None,
            ),
            what=f"an export counting the 20 requests in {duration}",
        )
        wait_for(lambda: len([s for s in receiver.spans() if s.kind == SERVER]) >= 20)
        scraped = server.scrape()

    # one request holds the app's resource, the app's own metrics and poolwatch's
    (resource_metrics,) = export.resource_metrics
    resource = attributes(resource_metrics.resource.attributes)
    assert resource["service.name"] == "shop-api"
    assert resource["telemetry.auto.version"]  # the distro's resource: the app's, not a second
    found = instruments(export)  # fails on a name exported twice
    scopes = {name: scope for name, (scope, _) in found.items()}
    assert scopes["db.client.connection.count"] == "poolwatch"
    assert scopes["asyncio.event_loop.lag"] == "poolwatch"
    assert scopes[duration] == "opentelemetry.instrumentation.fastapi"
    assert scopes["http.server.active_requests"] == "opentelemetry.instrumentation.fastapi"
    pools = {
        attributes(p.attributes)["db.client.connection.pool.name"]
        for p in found["db.client.connection.count"][1].sum.data_points
    }
    assert pools == {f"127.0.0.1:{postgres.port}/app", f"127.0.0.1:{postgres.port}/app#2"}
    waits = found["db.client.connection.wait_time"][1].histogram.data_points
    assert sum(p.count for p in waits) == 8  # 4 SQLAlchemy + 4 asyncpg checkouts

    # every request: one SERVER span, and no INTERNAL span of the same name (a second middleware)
    spans = receiver.spans()
    server_spans = [s for s in spans if s.kind == SERVER]
    assert len(server_spans) == 20
    assert {s.name for s in server_spans} == {"GET /users/{user_id}", "GET /sa/query"} | {
        "GET /apg/query",
        "GET",  # the unmatched path: the FastAPI instrumentation names it by the method
    }
    names = {s.name for s in server_spans}
    assert not [s for s in spans if s.kind == INTERNAL and s.name in names]

    # poolwatch's own /metrics: the pools and the loop; its http.server series stepped aside
    assert scraped.find("db_client_connection_count")
    assert scraped.find("asyncio_event_loop_lag_seconds_count")
    assert not [s for s in scraped.samples if s.name.startswith("http_server")]
    log = server.log()
    assert log.count("http.server.* metrics step aside") == 1
    assert "not supported" not in log and "Traceback" not in log


def test_delta_temporality_of_the_apps_exporter_is_honoured(app_server, postgres):
    """``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta``: poolwatch's counters and
    histograms arrive as deltas too, and the deltas add up to what happened."""
    extra = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"}
    with GrpcReceiver() as receiver:
        server = app_server(APP, distro_env(receiver, postgres, **extra), prefix=DISTRO)
        for _ in range(3):
            assert [status(server.url + "/sa/query") for _ in range(5)] == [200] * 5
            time.sleep(0.4)  # spread over several exports
        started = time.monotonic()
        receiver.export_after(started)
        last = receiver.export_after(time.monotonic())  # one more: everything was sent
        exports = [body for _, body in list(receiver.metrics)]
    waits, timeouts, fastapi = 0, 0, 0
    for export in exports:
        found = instruments(export)
        if "db.client.connection.wait_time" not in found:
            continue  # exported before the app's first query made its engine's pool known
        wait = found["db.client.connection.wait_time"][1].histogram
        assert wait.aggregation_temporality == DELTA
        waits += sum(p.count for p in wait.data_points)
        timeout = found["db.client.connection.timeouts"][1].sum
        assert timeout.aggregation_temporality == DELTA and timeout.is_monotonic
        timeouts += sum(p.as_int or p.as_double for p in timeout.data_points)
        if "http.server.duration" in found:
            fastapi += sum(p.count for p in found["http.server.duration"][1].histogram.data_points)
    assert waits == 15 and timeouts == 0 and fastapi == 15
    # what is not a counter stays as it was: the pool's current connections
    count = instruments(last)["db.client.connection.count"][1].sum
    assert count.aggregation_temporality == 2 and not count.is_monotonic


def test_a_collector_that_is_down_costs_the_app_nothing_and_is_counted(app_server, postgres):
    """The same app under the distro, with and without poolwatch, exporting to a port where
    nothing listens: both serve every request alike; poolwatch counts the failed exports."""

    class Down:
        endpoint = f"http://127.0.0.1:{free_port()}"

    env = distro_env(Down, postgres, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    watched = app_server(APP, env, prefix=DISTRO)
    bare = app_server(APP, {**env, "TEST_APP_BARE": "1"}, prefix=DISTRO, metrics=False)

    def latencies(url: str, n: int = 40) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            assert status(url + "/users/1") == 200
            out.append(time.perf_counter() - start)
        return out

    wait_for(
        lambda: watched.scrape().value("poolwatch_agent_errors_total", probe="otlp") >= 1,
        what="a failed export counted",
    )
    base, with_poolwatch = [], []
    for _ in range(3):  # interleaved rounds while exports keep failing
        base += latencies(bare.url)
        with_poolwatch += latencies(watched.url)
    assert [status(watched.url + p) for p in PATHS] == [status(bare.url + p) for p in PATHS]
    assert statistics.median(with_poolwatch) < statistics.median(base) * 1.5 + 0.002
    assert max(with_poolwatch) < 1.0  # no request waited on an export
    log = watched.log()
    assert log.count("poolwatch hook failed") <= 1  # logged once, counted every time


def test_a_provider_the_app_sets_in_its_lifespan_gets_poolwatchs_metrics(app_server, postgres):
    """No distro: the app's lifespan sets an SDK MeterProvider (OTLP over gRPC) before start-up
    ends; poolwatch's metrics go out in its export requests, with its resource."""
    with GrpcReceiver() as receiver:
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "OTEL_APP": "lifespan_provider",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
        }
        server = app_server("tests.apps.otel_app:app", env)
        assert [status(server.url + "/sa/query") for _ in range(3)] == [200] * 3
        export = receiver.export_after(time.monotonic())
    (resource_metrics,) = export.resource_metrics
    assert attributes(resource_metrics.resource.attributes)["service.name"] == "otel-app"
    found = instruments(export)  # fails on a name exported twice
    assert found["db.client.connection.wait_time"][0] == "poolwatch"
    log = server.log()
    assert "join the app's MeterProvider" in log
    from fastapi import FastAPI

    if "telemetry" in inspect.signature(FastAPI).parameters:
        # FastAPI's own OpenTelemetry support records the HTTP metrics into that provider
        assert found["http.server.request.duration"][0] == "fastapi"
        assert "step aside: FastAPI's own OpenTelemetry telemetry" in log
    else:  # nothing of OpenTelemetry records them: poolwatch's stay
        assert found["http.server.request.duration"][0] == "poolwatch"


@pytest.mark.parametrize("otel_app", ["instrument_app", "asgi_middleware"])
def test_tracing_mode_adds_no_second_server_span(app_server, postgres, otel_app):
    """OpenTelemetry's instrumentation applied by the app's code after ``instrument(app)``, and
    tracing mode asked for: one SERVER span per request, and no INTERNAL twin."""
    with GrpcReceiver() as receiver:
        env = {
            "OTEL_APP": otel_app,
            "POOLWATCH_TRACING": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        server = app_server("tests.apps.otel_app:app", env)
        assert [status(server.url + f"/users/{n}") for n in range(5)] == [200] * 5
        wait_for(lambda: len([s for s in receiver.spans() if s.kind == SERVER]) >= 5)
        time.sleep(0.5)  # a second span of a request would have arrived by now
        export = receiver.export_after(time.monotonic())
    spans = receiver.spans()
    server_spans = [s for s in spans if s.kind == SERVER]
    assert len(server_spans) == 5
    names = {s.name for s in server_spans}
    assert not [s for s in spans if s.kind == INTERNAL and s.name in names]
    assert len({s.trace_id for s in server_spans}) == 5
    found = instruments(export)  # fails on a name exported twice
    assert found["http.server.active_requests"][0].startswith("opentelemetry.instrumentation")
    assert "tracing mode adds no ASGI middleware" in server.log()


@pytest.mark.parametrize(
    "variables",
    [
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        },
    ],
    ids=["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"],
)
def test_poolwatchs_own_provider_exports_over_grpc(app_server, postgres, variables):
    with GrpcReceiver() as receiver:
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_SERVICE_NAME": "grpc-app",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",  # a gRPC target
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            **variables,
        }
        server = app_server(APP, env)
        assert [status(server.url + "/sa/query") for _ in range(4)] == [200] * 4
        export = receiver.export_after(time.monotonic())
    (resource_metrics,) = export.resource_metrics
    assert attributes(resource_metrics.resource.attributes)["service.name"] == "grpc-app"
    found = instruments(export)
    assert {scope for scope, _ in found.values()} == {"poolwatch"}
    waits = found["db.client.connection.wait_time"][1].histogram.data_points
    assert sum(p.count for p in waits) == 4
    assert found["http.server.request.duration"][0] == "poolwatch"
    assert "Traceback" not in server.log()
