"""Issue 6 end to end: a real Prometheus (1 s scrape and evaluation) loads the rules generated
with short `for:` windows (an override file) and scrapes a real instrumented app under uvicorn
on a real PostgreSQL; pool exhaustion and a blocked loop fire the matching alerts, a healthy
load of the same length fires none. The fleet budget alert runs on the sidecar exporter's view of
the same PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import pytest
import yaml

from poolwatch.generators.rules import RULES_PATH
from tests.support.alerting import (
    SHORT_WINDOWS,
    Load,
    generate,
)
from tests.support.apps import REPO, AppServer, start_app
from tests.support.exporter import run_exporter
from tests.support.load import burst
from tests.support.net import free_port, wait_for, wait_for_port
from tests.support.prometheus import Prometheus, start_prometheus
from tests.support.upstream import Upstream

PHASE = 20.0  # seconds of healthy load; pool exhaustion must fire its alerts within as long
TARGET = {"job": "orders", "service": "orders", "namespace": "shop"}


@dataclass
class Stack:
    app: AppServer
    prom: Prometheus
    sa_pool: str
    apg_pool: str
    calls: AppServer  # the app calling an upstream through aiohttp
    upstream_port: int

    def firing(self) -> dict[tuple[str, str], dict]:
        """Firing alerts by (alertname, pool name or "")."""
        return {
            (a["labels"]["alertname"], a["labels"].get("db_client_connection_pool_name", "")): a
            for a in self.prom.firing()
        }

    def firing_all(self, expected: set[tuple[str, str]]) -> dict | None:
        firing = self.firing()
        return firing if expected <= set(firing) else None

    def wait_quiet(self) -> None:
        wait_for(lambda: not self.prom.alerts(), 40, "no alert pending or firing")


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """Prometheus scraping two apps of one service: pools (SQLAlchemy and asyncpg on
    PostgreSQL) and an aiohttp session (limit_per_host=2) calling a slow upstream."""
    root = tmp_path_factory.mktemp("generated")
    generate(str(root), SHORT_WINDOWS)
    env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "ASYNCPG_DSN": postgres.dsn(),
        "POOL_SIZE": "2",  # SQLAlchemy: 2 + 1 overflow; asyncpg: max_size 3
        "MAX_OVERFLOW": "1",
        "POOL_TIMEOUT": "0.2",
    }
    with contextlib.ExitStack() as stop, Upstream() as upstream:
        app = start_app("tests.apps.pool_app:app", env)
        stop.callback(app.stop)
        calls = start_app(
            "tests.apps.aiohttp_app:app",
            {"UPSTREAM_PAY": upstream.url + "/slow?delay=0.5", "LIMIT_PER_HOST": "2"},
        )
        stop.callback(calls.stop)
        for route in ("/sa/hold?seconds=0.05", "/apg/hold?seconds=0.05"):  # open 2 connections
            assert asyncio.run(burst(app.url + route, 2)) == [200, 200]
        names = sorted(
            s.labels["db_client_connection_pool_name"]
            for s in app.scrape().find("db_client_connection_max")
        )
        sa_pool, apg_pool = names  # "host:port/app" and, made second, "host:port/app#2"
        assert apg_pool == sa_pool + "#2"
        prom = start_prometheus(
            {"orders": [f"127.0.0.1:{app.metrics_port}", f"127.0.0.1:{calls.metrics_port}"]},
            [str(root / RULES_PATH)],
            labels={"service": "orders", "namespace": "shop"},
        )
        stop.callback(prom.stop)
        wait_for(lambda: prom.query("db_client_connection_max"), 30, "Prometheus scraped the app")
        yield Stack(app, prom, sa_pool, apg_pool, calls, upstream.port)


def test_fleet_connection_budget_fires_when_the_fleet_outgrows_max_connections(postgres, tmp_path):
    """The server's view from `poolwatch exporter --postgres-dsn` (max_connections 200, 3
    reserved) against the pool maxima of every app using that server: one app (90) fits, a
    second one (SQLAlchemy 90 + asyncpg 90) takes the fleet over the budget."""
    generate(str(tmp_path), SHORT_WINDOWS)
    capacity = 200 - 3  # tests.support.postgres starts the server with max_connections=200
    first_env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "POOL_SIZE": "90",
        "MAX_OVERFLOW": "0",
    }
    second_port = free_port()  # the second app's metrics port, scraped (down) from the start
    second_env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "ASYNCPG_DSN": postgres.dsn(),
        "POOL_SIZE": "60",
        "MAX_OVERFLOW": "30",
        "POOLWATCH_METRICS_PORT": str(second_port),
    }
    started: list = []
    try:
        (tmp_path / "none").mkdir()  # no workers publish here: only the server view
        exporter = run_exporter(
            "--multiproc-dir", str(tmp_path / "none"), "--postgres-dsn", postgres.dsn()
        )
        started.append(exporter)
        first = start_app("tests.apps.pool_app:app", first_env)
        started.append(first)
        prom = start_prometheus(
            {
                "orders": [f"127.0.0.1:{first.metrics_port}", f"127.0.0.1:{second_port}"],
                "postgres-view": [f"127.0.0.1:{exporter.port}"],
            },
            [str(tmp_path / RULES_PATH)],
            labels={"namespace": "shop"},
        )
        started.append(prom)
        budget = "poolwatch:db_client_connection_fleet_budget:ratio"
        wait_for(lambda: prom.query(budget), 30, "the fleet budget recorded")
        deadline = time.monotonic() + 8  # 4 times `for:`: a fleet that fits stays quiet
        while time.monotonic() < deadline:
            assert not prom.alerts(), prom.alerts()
            time.sleep(0.5)
        (value,) = prom.query(budget)
        server = {"server_address": postgres.host, "server_port": str(postgres.port)}
        assert value["metric"] == {"__name__": budget, **server}
        assert float(value["value"][1]) == pytest.approx(90 / capacity)

        second = start_app("tests.apps.pool_app:app", second_env, wait_metrics=False)
        started.append(second)
        wait_for_port(second_port)
        expected = {"FleetConnectionBudgetWarning", "FleetConnectionBudgetCritical"}
        firing = wait_for(
            lambda: (
                (names := {a["labels"]["alertname"]: a for a in prom.firing()})
                and expected <= set(names)
                and names
            ),
            PHASE,
            "fleet budget alerts firing",
        )
        for name in expected:
            alert = firing[name]
            assert alert["labels"] == {
                "alertname": name,
                "server_address": postgres.host,  # the server, as in the pools' default names
                "server_port": str(postgres.port),
                "severity": "critical" if name.endswith("Critical") else "warning",
                "signal": "fleet_connection_budget",
            }
            assert float(alert["value"]) == pytest.approx((90 + 90 + 90) / capacity)
            assert f"{postgres.host}:{postgres.port}" in alert["annotations"]["description"]
    finally:
        for server in reversed(started):
            server.stop()


def test_prometheus_runs_the_overridden_rules(stack):
    groups = stack.prom.get_json("/api/v1/rules")["data"]["groups"]
    alerts = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
    # every alert of the project's rule file, none lost or added by the override
    with open(os.path.join(REPO, RULES_PATH)) as stock:
        expected = {r.get("alert") for g in yaml.safe_load(stock)["groups"] for r in g["rules"]}
    assert set(alerts) == expected - {None}
    assert alerts["PoolUtilizationCritical"]["duration"] == 2  # `for: 2s` from the override file
    assert alerts["PoolUtilizationCritical"]["query"].endswith("> 0.9")  # the table's threshold
    assert "[3s]" in alerts["CheckoutTimeoutsCritical"]["query"] or any(
        "[3s]" in r["query"] for g in groups for r in g["rules"] if r["type"] == "recording"
    )


def test_a_healthy_load_fires_nothing(stack):
    stack.wait_quiet()
    seen: set[str] = set()
    app = stack.app
    # 2 clients per pool of 3 connections: 67 % used, just under the 70 % warning
    urls = [app.url + "/sa/hold?seconds=0.05", app.url + "/apg/hold?seconds=0.05"]
    with Load(urls, concurrency=2, limit=PHASE + 10) as load:
        deadline = time.monotonic() + PHASE
        while time.monotonic() < deadline:
            seen |= {a["labels"]["alertname"] for a in stack.prom.firing()}
            time.sleep(0.5)
    timeouts = stack.prom.query("db_client_connection_timeouts_total")
    assert load.statuses.get(200, 0) > 100 and set(load.statuses) == {200}, (
        load.statuses,
        timeouts,
    )
    assert not seen, f"alerts fired on a healthy load: {seen}"
    # the load really used the pools, up to just under the warning threshold
    peak = stack.prom.query(
        f"max_over_time(poolwatch:db_client_connection_utilization:ratio[{int(PHASE)}s])"
    )
    assert {r["metric"]["db_client_connection_pool_name"] for r in peak} == {
        stack.sa_pool,
        stack.apg_pool,
    }
    assert all(0.3 <= float(r["value"][1]) < 0.7 for r in peak), peak


def test_pool_exhaustion_fires_the_pool_alerts(stack):
    stack.wait_quiet()
    sa, apg = stack.sa_pool, stack.apg_pool
    expected = {
        ("PoolUtilizationCritical", sa),
        ("PoolUtilizationWarning", sa),
        ("PoolOverflowCritical", sa),
        ("CheckoutTimeoutsCritical", sa),
        ("ConnectionWaitWarning", sa),
        ("PoolUtilizationCritical", apg),
        ("CheckoutTimeoutsCritical", apg),
    }
    urls = [stack.app.url + "/sa/hold?seconds=0.5", stack.app.url + "/apg/hold?seconds=0.5"]
    started = time.monotonic()
    with Load(urls, concurrency=10, limit=PHASE + 10) as load:
        firing = wait_for(lambda: stack.firing_all(expected), PHASE, f"{sorted(expected)} firing")
    assert time.monotonic() - started < PHASE
    assert load.statuses.get(503, 0) > 0  # the app really ran out of connections
    for name, pool in expected:
        alert = firing[(name, pool)]
        severity = "critical" if name.endswith("Critical") else "warning"
        labels = alert["labels"]
        assert labels["severity"] == severity
        assert labels["db_client_connection_pool_name"] == pool
        assert {k: labels[k] for k in TARGET} == TARGET
        assert labels["instance"] == f"127.0.0.1:{stack.app.metrics_port}"
        assert "worker" not in labels
        assert pool in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].startswith("alerts/runbook.md#")
    assert float(firing[("PoolUtilizationCritical", sa)]["value"]) == 1.0
    assert float(firing[("CheckoutTimeoutsCritical", sa)]["value"]) > 10


def test_a_full_http_connector_fires_the_http_client_alerts(stack):
    stack.wait_quiet()
    expected = {("HttpClientPoolCritical", ""), ("HttpClientPoolWarning", "")}
    # 6 calls at a time through a session allowing 2 connections per host: requests queue
    with Load([stack.calls.url + "/call/pay"], concurrency=6, limit=PHASE + 10) as load:
        firing = wait_for(lambda: stack.firing_all(expected), PHASE, "HTTP client alerts firing")
    assert set(load.statuses) == {200}, load.statuses  # queued, not failed
    for name, _ in expected:
        alert = firing[(name, "")]
        labels = alert["labels"]
        assert labels["severity"] == ("critical" if name.endswith("Critical") else "warning")
        assert (labels["server_address"], labels["server_port"]) == (
            "127.0.0.1",
            str(stack.upstream_port),
        )
        assert labels["instance"] == f"127.0.0.1:{stack.calls.metrics_port}"
        assert {k: labels[k] for k in TARGET} == TARGET
        assert float(alert["value"]) == 1.0  # 2 active of limit_per_host 2
        assert f"127.0.0.1:{stack.upstream_port}" in alert["annotations"]["description"]


def test_a_blocked_loop_fires_event_loop_lag(stack):
    stack.wait_quiet()
    expected = {("EventLoopLagCritical", ""), ("EventLoopLagWarning", "")}
    with Load([stack.app.url + "/block?seconds=1.5"], concurrency=2, limit=PHASE + 10):
        firing = wait_for(lambda: stack.firing_all(expected), PHASE, "event-loop lag alerts firing")
    for name, _ in expected:
        labels = firing[(name, "")]["labels"]
        assert labels["severity"] == ("critical" if name.endswith("Critical") else "warning")
        assert {k: labels[k] for k in TARGET} == TARGET
    assert float(firing[("EventLoopLagCritical", "")]["value"]) > 1.0
