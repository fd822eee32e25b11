"""Issue 5: OTLP/HTTP export of every metric, into a real receiver; tracing mode.

The app runs in real uvicorn with a SQLAlchemy pool and an asyncpg pool on a real PostgreSQL;
the receiver decodes what the SDK's exporter sends with ``opentelemetry-proto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time

import aiohttp
import pytest

from poolwatch import metrics as contract
from tests.support.net import free_port
from tests.support.otlp import OtlpReceiver, attributes, instruments
from tests.support.upstream import Upstream

APP = "tests.apps.http_app:app"
BY_NAME = {m.name: m for m in vars(contract).values() if isinstance(m, contract.Metric)}


def otlp_env(receiver_url: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        **extra,
    }


async def load(url: str, paths: list[str], parallel: int = 8) -> list[int]:
    limit = asyncio.Semaphore(parallel)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(path: str) -> int:
            async with limit, session.get(url + path) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(p) for p in paths))


def prometheus_view(metric, point) -> list[tuple[str, dict[str, str], float]]:
    """An OTLP data point as the Prometheus samples it must equal (DESIGN §3 translation)."""
    definition = BY_NAME[metric.name]
    labels = {contract.prom_label(k): str(v) for k, v in attributes(point.attributes).items()}
    name = definition.prom_name
    if metric.WhichOneof("data") == "histogram":
        out = [(f"{name}_count", labels, point.count), (f"{name}_sum", labels, point.sum)]
        running = 0
        bounds = [*(f"{b}" for b in point.explicit_bounds), "+Inf"]
        for le, n in zip(bounds, point.bucket_counts, strict=True):
            running += n
            out.append((f"{name}_bucket", {**labels, "le": le}, running))
        return out
    value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
    suffix = "_total" if definition.kind == contract.COUNTER else ""
    return [(name + suffix, labels, value)]


def prom_value(samples, name: str, labels: dict[str, str]) -> float:
    if "le" in labels:  # the exposition writes 1.0 for the bound 1
        labels = {**labels, "le": labels["le"] if labels["le"] == "+Inf" else float(labels["le"])}
        found = [
            s
            for s in samples.find(name)
            if float(s.labels["le"]) == float(labels["le"])
            and {k: v for k, v in s.labels.items() if k != "le"}
            == {k: v for k, v in labels.items() if k != "le"}
        ]
    else:
        found = [s for s in samples.find(name) if s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} Prometheus samples"
    return found[0].value


async def test_otlp_export_holds_every_metric_as_semconv_matching_prometheus(app_server, postgres):
    with contextlib.ExitStack() as stack:
        await _export_matches_prometheus(app_server, postgres, stack)


async def _export_matches_prometheus(app_server, postgres, stack) -> None:
    async with OtlpReceiver() as receiver:
        upstream = stack.enter_context(Upstream())
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "ASYNCPG_DSN": postgres.dsn(),
            "UPSTREAM_URL": upstream.url,
            "OTEL_SERVICE_NAME": "shop-api",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,team=payments",
            **otlp_env(receiver.url),
        }
        server = app_server(APP, env)
        paths = ["/sa/query", "/apg/query", "/users/7", "/nope", "/sa/hold?seconds=0.05"] * 20
        statuses = await load(server.url, paths + ["/upstream"] * 20)
        assert statuses.count(200) == 100 and statuses.count(404) == 20
        await asyncio.sleep(0.3)  # quiet from here on: both exporters read the same state
        scraped_at = time.monotonic()
        samples = server.scrape()
        export = await receiver.export_after(scraped_at + 0.05)

    # the resource: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, one instance id per worker
    (resource_metrics,) = export.resource_metrics
    resource = attributes(resource_metrics.resource.attributes)
    assert resource["service.name"] == "shop-api"
    assert resource["deployment.environment.name"] == "test" and resource["team"] == "payments"
    assert resource["service.instance.id"]  # the SDK's, one per process

    found = instruments(export)
    assert {scope for scope, _ in found.values()} == {"poolwatch"}
    # the contract's instruments, by their semconv names, types and units (DESIGN §3)
    expected = {
        "db.client.connection.count": ("sum", False, "{connection}"),
        "db.client.connection.idle.max": ("sum", False, "{connection}"),
        "db.client.connection.idle.min": ("sum", False, "{connection}"),
        "db.client.connection.max": ("sum", False, "{connection}"),
        "db.client.connection.pending_requests": ("sum", False, "{request}"),
        "db.client.connection.timeouts": ("sum", True, "{timeout}"),
        "db.client.connection.create_time": ("histogram", None, "s"),
        "db.client.connection.wait_time": ("histogram", None, "s"),
        "db.client.connection.use_time": ("histogram", None, "s"),
        "sqlalchemy.pool.overflow": ("gauge", None, "{connection}"),
        "sqlalchemy.pool.invalidations": ("sum", True, "{invalidation}"),
        "poolwatch.connection.leaks": ("sum", True, "{leak}"),
        "http.server.request.duration": ("histogram", None, "s"),
        "http.server.active_requests": ("sum", False, "{request}"),
        "poolwatch.build_info": ("gauge", None, "1"),
        "poolwatch.agent.errors": ("sum", True, "{error}"),
        "http.client.open_connections": ("sum", False, "{connection}"),
        "http.client.connection.duration": ("histogram", None, "s"),
        "aiohttp.client.connection.limit": ("gauge", None, "{connection}"),
        "aiohttp.client.connection.wait_time": ("histogram", None, "s"),
        "asyncio.event_loop.lag": ("histogram", None, "s"),
        "asyncio.tasks": ("sum", False, "{task}"),
    }
    for name, (kind, monotonic, unit) in expected.items():
        assert name in found, f"{name} missing from the OTLP export"
        metric = found[name][1]
        assert (metric.WhichOneof("data"), metric.unit) == (kind, unit), name
        data = getattr(metric, kind)
        if kind != "gauge":
            assert data.aggregation_temporality == 2, name  # CUMULATIVE
        if kind == "sum":
            assert data.is_monotonic is monotonic, name

    # attribute keys and types are the semconv ones
    count = found["db.client.connection.count"][1].sum.data_points
    pools = {attributes(p.attributes)["db.client.connection.pool.name"] for p in count}
    assert pools == {f"127.0.0.1:{postgres.port}/app", f"127.0.0.1:{postgres.port}/app#2"}
    assert {attributes(p.attributes)["db.client.connection.state"] for p in count} == {
        "idle",
        "used",
    }
    durations = found["http.server.request.duration"][1].histogram.data_points
    keys = {tuple(sorted(attributes(p.attributes))) for p in durations}
    assert keys == {("http.request.method", "http.response.status_code", "http.route")}
    routes = {attributes(p.attributes)["http.route"]: p for p in durations}
    assert routes["/users/{user_id}"].count == 20
    assert attributes(routes["/users/{user_id}"].attributes)["http.response.status_code"] == 200
    assert list(routes["/users/{user_id}"].explicit_bounds) == list(contract.BUCKETS)
    wait = found["db.client.connection.wait_time"][1].histogram.data_points
    assert sum(p.count for p in wait) == 60  # 20 asyncpg + 40 SQLAlchemy checkouts
    connections = found["http.client.open_connections"][1].sum.data_points
    (idle,) = [
        p for p in connections if attributes(p.attributes)["http.connection.state"] == "idle"
    ]
    assert attributes(idle.attributes)["server.address"] == "127.0.0.1"
    assert attributes(idle.attributes)["server.port"] == upstream.port  # an int, as semconv says
    assert idle.as_int >= 1

    # every exported value equals what /metrics shows (the loop's own series move on between
    # the scrape and the export: only present there), and every poolwatch family is exported
    compared = 0
    for name, (_, metric) in found.items():
        data = getattr(metric, metric.WhichOneof("data"))
        for point in data.data_points:
            for prom_name, labels, value in prometheus_view(metric, point):
                scraped_value = prom_value(samples, prom_name, labels)
                if not name.startswith("asyncio."):
                    assert math.isclose(scraped_value, value, rel_tol=1e-9), (prom_name, labels)
                    compared += 1
    assert compared > 200
    exported = {BY_NAME[name].prom_name for name in found}
    scraped = {
        f.name
        for f in __import__("prometheus_client").parser.text_string_to_metric_families(samples.text)
    }
    assert scraped == exported


@pytest.mark.parametrize("collector", ["down", "answers after 10 s"])
async def test_a_failing_collector_costs_the_app_nothing_and_is_counted(app_server, collector):
    async def latencies(url: str, n: int = 300) -> list[float]:
        async with aiohttp.ClientSession() as session:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                async with session.get(url + "/users/1") as response:
                    await response.read()
                out.append(time.perf_counter() - start)
            return out

    async with OtlpReceiver(delay=10.0) as slow:
        endpoint = slow.url if collector != "down" else f"http://127.0.0.1:{free_port()}"
        failing = app_server(APP, otlp_env(endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="2"))
        quiet = app_server(APP)  # the same app, no OTLP
        await latencies(failing.url, 50)  # warm both
        await latencies(quiet.url, 50)
        deadline = time.monotonic() + 20
        while failing.scrape().value("poolwatch_agent_errors_total", probe="otlp") < 1:
            assert time.monotonic() < deadline, "the failed export was not counted"
            await asyncio.sleep(0.2)
        # measure while exports keep failing (each waits up to 2 s): interleaved rounds until
        # two more failures were counted
        base, with_failures, rounds, errors_after = [], [], 0, 0.0
        while rounds < 3 or errors_after < 3:
            assert time.monotonic() < deadline + 30, "failed exports stopped being counted"
            base += await latencies(quiet.url)
            with_failures += await latencies(failing.url)
            errors_after = failing.scrape().value("poolwatch_agent_errors_total", probe="otlp")
            rounds += 1
        if collector != "down":
            assert slow.posts >= 1  # the exports did reach the slow collector
    median_base, median_failing = statistics.median(base), statistics.median(with_failures)
    assert median_failing < median_base * 1.5 + 0.002, (median_base, median_failing)
    assert max(with_failures) < 1.5  # no request waited on an export (each takes 2 s)
    assert "Traceback" not in failing.log().split("poolwatch hook failed")[0]


async def test_tracing_mode_sends_spans_and_keeps_the_same_http_series(app_server, postgres):
    async with OtlpReceiver() as receiver:
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "OTEL_TRACES_EXPORTER": "otlp",  # the standard setting asking for traces
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            **otlp_env(receiver.url),
        }
        traced = app_server(APP, env)
        plain = app_server(APP, {"SA_URL": env["SA_URL"]})
        paths = ["/users/3", "/users/4", "/nope", "/orders/1/items/2"]
        for server in (traced, plain):
            statuses = await load(server.url, paths[:3])
            async with (
                aiohttp.ClientSession() as session,
                session.post(server.url + paths[3]) as response,
            ):
                statuses.append(response.status)
            assert statuses == [200, 200, 404, 201]
        deadline = time.monotonic() + 15
        while len([s for s in spans(receiver) if s.kind == 2]) < 4:  # SPAN_KIND_SERVER
            assert time.monotonic() < deadline, "no server spans received"
            await asyncio.sleep(0.1)
        export = await receiver.export_after(time.monotonic())

    names = {s.name for s in spans(receiver) if s.kind == 2}
    assert {"GET /users/{user_id}", "POST /orders/{order_id}/items/{item_id}"} <= names
    # the same HTTP series, names and labels, in both modes
    traced_series = {
        (s.name, tuple(sorted(s.labels.items())))
        for s in traced.scrape().samples
        if s.name.startswith("http_server")
    }
    plain_series = {
        (s.name, tuple(sorted(s.labels.items())))
        for s in plain.scrape().samples
        if s.name.startswith("http_server")
    }
    assert traced_series == plain_series and traced_series
    # OpenTelemetry's own HTTP metrics do not double ours in the OTLP export
    found = instruments(export)
    assert [n for n in found if n.startswith("http.server")] == [
        "http.server.request.duration",
        "http.server.active_requests",
    ]


def spans(receiver: OtlpReceiver) -> list:
    return [
        span
        for request in receiver.traces
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon"),
    ],
)
def test_bad_otel_settings_stop_the_app_at_startup_naming_the_variable(app_server, variable, value):
    env = otlp_env("http://127.0.0.1:4318")
    env[variable] = value
    with pytest.raises(RuntimeError) as failed:
        app_server(APP, env)
    line = next(x for x in str(failed.value).splitlines() if f"{variable}={value!r}" in x)
    assert "poolwatch" in line or "invalid" in line


@pytest.mark.parametrize(
    ("otlp_option", "environ", "wanted"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_METRICS_EXPORTER": "otlp"}, True),
        (False, {"OTEL_METRICS_EXPORTER": "prometheus,otlp"}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        (False, {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, True),
        (
            False,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"},
            False,
        ),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_when_otlp_export_is_on(otlp_option, environ, wanted):
    from poolwatch.config import load_settings
    from poolwatch.exporters._otel_env import otlp_wanted

    assert otlp_wanted(load_settings({"otlp": otlp_option}, environ={}), environ) is wanted


@pytest.mark.parametrize(
    ("tracing_option", "environ", "wanted"),
    [
        (None, {}, False),
        (True, {}, True),
        (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, False),  # POOLWATCH_TRACING=false always wins
        (None, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),  # metrics only
    ],
)
def test_when_tracing_mode_is_on(tracing_option, environ, wanted):
    from poolwatch.config import load_settings
    from poolwatch.exporters._otel_env import tracing_wanted

    assert tracing_wanted(load_settings({"tracing": tracing_option}, environ={}), environ) is wanted


async def test_instrument_otlp_option_exports_and_stop_sends_the_last_values(
    clean_agent, monkeypatch, tmp_path
):
    """In process: ``instrument(otlp=True)``; stopping the agent flushes without blocking."""
    from sqlalchemy import create_engine, text

    import poolwatch
    from poolwatch.agent import agent

    async with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{receiver.url}/v1/metrics")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")  # only the flush on stop
        poolwatch.instrument(metrics_port=0, otlp=True)
        agent.start()
        engine = create_engine(f"sqlite:///{tmp_path}/o.db", pool_logging_name="in-proc")
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        started = time.monotonic()
        agent.stop()
        assert time.monotonic() - started < 0.5  # the last export runs on its own thread
        export = await receiver.export_after(started)
    wait = instruments(export)["db.client.connection.wait_time"][1].histogram.data_points
    (point,) = [
        p for p in wait if attributes(p.attributes) == {"db.client.connection.pool.name": "in-proc"}
    ]
    assert point.count == 3
