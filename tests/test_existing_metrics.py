"""An app that already serves ``/metrics``: ``instrument(app, registry=...)`` puts poolwatch's
series there, beside prometheus-fastapi-instrumentator, starlette-exporter, prometheus_client's
ASGI app and OpenTelemetry's Prometheus exporter, without a name clash.

Each app runs in real uvicorn on a real PostgreSQL; each scrape is checked by ``promtool check
metrics`` (Prometheus' own text parser: a family written twice is an error there, while
prometheus_client's parser would let it pass) and by prometheus_client's parser.
"""

from __future__ import annotations

import subprocess
import urllib.error

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import Samples, get

APP = "tests.apps.metrics_beside_app:app"
PATHS = ["/sa/query", "/users/1", "/users/2", "/nope"]
POOLWATCH = ["db_client_connection_count", "db_client_connection_wait_time_seconds"]
LOOP = ["asyncio_event_loop_lag_seconds", "asyncio_tasks"]


def checked(text: str) -> Samples:
    """The exposition, parsed; fails where Prometheus would refuse it."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert "error while linting" not in result.stdout + result.stderr, result.stderr
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    return Samples(text)


def serve(app_server, postgres, lib: str, **env: str | None):
    server = app_server(
        APP,
        {
            "TEST_APP_BARE": "1",  # pool_app's own instrument() off: the app calls it itself
            "METRICS_LIB": lib,
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            **env,
        },
        metrics=False,
    )
    for path in PATHS * 3:
        try:
            get(server.url + path)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and path == "/nope"
    return server


def families(samples: Samples) -> set[str]:
    return {f.name for f in text_string_to_metric_families(samples.text)}


@pytest.mark.parametrize(
    ("lib", "path", "theirs"),
    [
        ("instrumentator", "/metrics", ["http_requests", "http_request_duration_seconds"]),
        (
            "starlette_exporter",
            "/metrics",
            ["starlette_requests", "starlette_request_duration_seconds"],
        ),
        ("make_asgi_app", "/metrics/", ["process_cpu_seconds", "python_info"]),
    ],
)
def test_poolwatch_series_in_the_apps_own_metrics(app_server, postgres, lib, path, theirs):
    server = serve(app_server, postgres, lib)
    samples = checked(get(server.url + path))
    present = families(samples)
    assert set(theirs) <= present  # the library's own series are still there
    assert set(POOLWATCH + LOOP) <= present  # poolwatch's pools and loop...
    route = samples.find(
        "http_server_request_duration_seconds_count", http_route="/users/{user_id}"
    )
    assert [s.value for s in route] == [6]  # ...and its HTTP series
    pools = {s.labels["db_client_connection_pool_name"] for s in samples.find(POOLWATCH[0])}
    assert pools == {f"127.0.0.1:{postgres.port}/app"}
    log = server.log()
    assert "the series are in the app's own registry" in log  # no listener of its own
    assert "not in the app's prometheus_client registry" not in log


@pytest.mark.parametrize("registry", ["default", "none"], ids=["registry=REGISTRY", "no registry="])
def test_beside_opentelemetrys_prometheus_exporter(app_server, postgres, registry):
    """An SDK MeterProvider with OpenTelemetry's Prometheus reader and the FastAPI
    instrumentation: poolwatch's collector goes into that reader's registry (asked for or not),
    and the HTTP series are OpenTelemetry's, once."""
    env = {"POOLWATCH_REGISTRY": registry}
    if registry == "none":
        env["POOLWATCH_METRICS_PORT"] = None  # the default: poolwatch would listen on 9464
    server = serve(app_server, postgres, "otel_prometheus", **env)
    samples = checked(get(server.url + "/metrics/"))
    present = families(samples)
    assert set(POOLWATCH + LOOP) <= present
    assert {"target_info", "http_server_duration_milliseconds"} <= present  # OpenTelemetry's
    active = samples.find("http_server_active_requests")
    assert active and all(s.labels["otel_scope_name"].endswith("fastapi") for s in active)
    assert "http_server_request_duration_seconds" not in present  # poolwatch's stepped aside
    assert [s.value for s in samples.find("poolwatch_build_info")] == [1]  # once, not via OTel
    log = server.log()
    assert "the series are in the app's own registry" in log
    assert "http.server.* metrics step aside" in log


def test_a_name_clash_leaves_the_apps_metrics_as_they_were(app_server, postgres):
    """The app registered a series of a poolwatch name itself: poolwatch's collector is refused
    at registration (one warning, counted) and the app's /metrics is what it is without
    poolwatch."""
    clash = serve(app_server, postgres, "make_asgi_app", CLASH="1")
    bare = serve(app_server, postgres, "make_asgi_app", CLASH="1", POOLWATCH_REGISTRY="off")
    with_poolwatch = checked(get(clash.url + "/metrics/"))
    without = checked(get(bare.url + "/metrics/"))
    assert families(with_poolwatch) == families(without)
    assert with_poolwatch.value("db_client_connection_max") == 7  # the app's own gauge
    lines = [
        x for x in clash.log().splitlines() if "not in the app's prometheus_client registry" in x
    ]
    assert len(lines) == 1 and "db_client_connection_max" in lines[0]
    assert "Traceback" not in clash.log()
