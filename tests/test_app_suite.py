"""An app's own test suite passes the same with the one-liner in its app factory.

The shop (tests/apps/shop) has a suite of its own shaped like users' suites: a fresh app per test
under asgi-lifespan's LifespanManager and httpx, some Starlette TestClient tests, pytest-xdist
with two workers, a real PostgreSQL. Run unchanged, bare and with ``instrument(app)``, it must
pass the same, with nothing poolwatch logs at error level; also while a "dev server" holds the
default metrics port. The cost of the one-liner on the suite is measured by
bench/bench_app_suite.py, not asserted here.
"""

from __future__ import annotations

import socket
from collections import Counter

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch.agent import agent
from tests.apps.shop.app import create_app
from tests.support.shop_suite import SuiteRun, run_shop_suite

DEFAULT_PORT = 9464
PORT_TAKEN = f"POOLWATCH_METRICS_PORT={DEFAULT_PORT}: cannot listen on 127.0.0.1:{DEFAULT_PORT}"
BLOCKED = "event loop blocked"  # the loop probe's report of sign-up's scrypt: its job, no fault
STARTED = "poolwatch started"
# as the app's CI runs it; a regression (start-up failing under LifespanManager, 5 s per test)
# stops after three failures instead of running into the subprocess timeout
XDIST = ("-n", "2", "--maxfail=3")
# the shop's startup/shutdown handlers, as in the app it stands for
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def bare(postgres) -> SuiteRun:
    run = run_shop_suite(postgres.dsn(), poolwatch=False, args=XDIST)
    assert run.returncode == 0 and run.failures == 0 and run.passed >= 40, run.output
    assert not run.lines, run.output  # poolwatch is not in the bare run at all
    return run


def port_warnings(run: SuiteRun) -> Counter:
    """How often each worker said the default port is taken."""
    return Counter(line.worker for line in run.logged("warning") if PORT_TAKEN in line.text)


def assert_clean(run: SuiteRun, bare: SuiteRun) -> None:
    """Same passes as bare; poolwatch on in every worker, never logging an error."""
    assert (run.returncode, run.counts) == (0, bare.counts), run.output
    assert {line.worker for line in run.lines if line.text == STARTED} == {"gw0", "gw1"}
    assert not run.logged("error"), run.output
    assert "Traceback" not in run.output
    unexpected = [
        line
        for line in run.logged("warning")
        if PORT_TAKEN not in line.text and not line.text.startswith(BLOCKED)
    ]
    assert not unexpected, run.output


def test_the_suite_passes_the_same_with_the_one_liner(postgres, bare):
    run = run_shop_suite(postgres.dsn(), poolwatch=True, args=XDIST)
    assert_clean(run, bare)
    # the two workers (and anything else here) share the default port: a worker that finds it
    # taken serves its tests on without a listener and says so once
    assert all(count == 1 for count in port_warnings(run).values()), run.output


def test_a_dev_server_on_the_default_port_changes_nothing_but_one_line(postgres, bare):
    with socket.socket() as dev_server:
        dev_server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            dev_server.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError as exc:
            pytest.skip(f"127.0.0.1:{DEFAULT_PORT} is in use here ({exc.strerror}): cannot hold it")
        dev_server.listen()
        run = run_shop_suite(postgres.dsn(), poolwatch=True, args=XDIST)
        # two tests, two lifespans, in one process with its output not captured
        single = run_shop_suite(
            postgres.dsn(), poolwatch=True, args=("-p", "no:xdist", "-s", "-k", "health")
        )
    assert_clean(run, bare)
    assert port_warnings(run) == {"gw0": 1, "gw1": 1}, run.output  # once per process
    assert (single.returncode, single.passed, single.failures) == (0, 2, 0), single.output
    assert [line.text for line in single.lines].count(STARTED) == 2, single.output
    assert port_warnings(single) == {"main": 1}, single.output
    warning = next(line.text for line in single.logged("warning") if PORT_TAKEN in line.text)
    assert "Choose a free port, or set POOLWATCH_METRICS_PORT=0" in warning


# --- in-process: the port held, under LifespanManager ------------------------------------------
REQUESTS = ("/health", "/openapi.json", "/items/abc", "/nowhere")


async def serve(app) -> list[tuple[int, str]]:
    """Start ``app`` as the shop's suite does (failing if start-up takes over 1 s), send a few
    requests, stop it."""
    async with LifespanManager(app, startup_timeout=1):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            return [(r.status_code, r.text) for r in [await client.get(p) for p in REQUESTS]]


async def test_a_held_port_under_lifespan_manager_starts_serves_and_says_why_once(
    clean_agent, postgres, monkeypatch, capsys
):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("POOLWATCH_METRICS_PORT", str(port))
        expected = await serve(create_app(instrumented=False, database_url=postgres.dsn()))
        registry = CollectorRegistry()  # how a test reads poolwatch's series without a listener
        app = create_app(instrumented=False, database_url=postgres.dsn())
        poolwatch.instrument(app, registry=registry)
        errors_before = registry.get_sample_value(
            "poolwatch_agent_errors_total", {"probe": "exporter"}
        )
        first = await serve(app)
        second = await serve(app)  # the next test's lifespan: counted, not logged again
        errors_after = registry.get_sample_value(
            "poolwatch_agent_errors_total", {"probe": "exporter"}
        )
        health = registry.get_sample_value(
            "http_server_request_duration_seconds_count",
            {
                "http_request_method": "GET",
                "http_route": "/health",
                "http_response_status_code": "200",
            },
        )
    assert first == second == expected
    assert errors_after - errors_before == 2
    assert health == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "POOLWATCH_METRICS_PORT" in line]
    assert len(lines) == 1, (lines, err)
    assert f"POOLWATCH_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "[warning" in lines[0]
    assert "Choose a free port, or set POOLWATCH_METRICS_PORT=0 to turn it off" in lines[0]


async def test_metrics_port_zero_opens_nothing_and_says_nothing(
    clean_agent, postgres, monkeypatch, capsys
):
    monkeypatch.setenv("POOLWATCH_METRICS_PORT", "0")
    app = create_app(instrumented=True, database_url=postgres.dsn())
    async with LifespanManager(app, startup_timeout=1):
        assert agent.started and agent.metrics_url is None
    assert "[warning" not in capsys.readouterr().err


async def test_reading_metrics_with_poolwatch_testing_as_the_docs_show(
    clean_agent, postgres, monkeypatch, capsys
):
    """docs/testing-your-app.md: no listener in tests; poolwatch.testing.snapshot() reads the
    series as values."""
    from poolwatch.testing import snapshot

    monkeypatch.setenv("POOLWATCH_METRICS_PORT", "0")
    app = create_app(instrumented=True, database_url=postgres.dsn())  # the factory's one-liner
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app"}
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            before = snapshot()
            assert (await client.get("/health")).json() == {"ok": True}
        now = snapshot()
        assert now.value("db_client_connection_max", **pool) == 5
        assert (
            now.value("db_client_connection_count", **pool, db_client_connection_state="used") == 0
        )
        assert (
            now.value("db_client_connection_count", **pool, db_client_connection_state="idle") == 2
        )
        ok = {"http_request_method": "GET", "http_route": "/health"}
        assert before.get("http_server_request_duration_seconds_count", 0, **ok) == 0
        assert now.value("http_server_request_duration_seconds_count", **ok) == 1
        assert now.value("http_server_request_duration_seconds_bucket", le="+Inf", **ok) == 1
    assert not snapshot().find("db_client_connection_max", **pool)  # closed: gone
    assert "[warning" not in capsys.readouterr().err


async def test_reading_metrics_in_a_test_as_the_docs_show(
    clean_agent, postgres, monkeypatch, capsys
):
    """docs/testing-your-app.md: no listener in tests; the series read through a registry."""
    monkeypatch.setenv("POOLWATCH_METRICS_PORT", "0")
    app = create_app(instrumented=True, database_url=postgres.dsn())  # the factory's one-liner
    registry = CollectorRegistry()
    poolwatch.instrument(registry=registry)  # the same process-wide agent, now read here too
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app"}
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            assert (await client.get("/health")).json() == {"ok": True}
        assert registry.get_sample_value("db_client_connection_max", pool) == 5
        idle = registry.get_sample_value(
            "db_client_connection_count", {**pool, "db_client_connection_state": "idle"}
        )
        assert idle == 2  # min_size=2, none in use
        requests = registry.get_sample_value(
            "http_server_request_duration_seconds_count",
            {
                "http_request_method": "GET",
                "http_route": "/health",
                "http_response_status_code": "200",
            },
        )
        assert requests == 1
    assert "[warning" not in capsys.readouterr().err
