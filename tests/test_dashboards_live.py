"""Every panel query of every dashboard returns data from a real Prometheus scraping real
instrumented apps under load (pools exhausted, upstream queueing, a blocked loop), with the
variables on All and drilled down to real values; the fleet's connection budget matches the
database server's."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
import pytest

from poolwatch.generators.dashboards import ALERT_PANELS, UID
from poolwatch.generators.promql import RECORDS
from poolwatch.generators.rules import RULES_PATH
from tests.support.apps import REPO, start_app
from tests.support.dashboards import DASHBOARDS, METRIC, VARIABLE, Target, load_dashboard, targets
from tests.support.exporter import run_exporter, start_workers
from tests.support.postgres import PASSWORD
from tests.support.prometheus import Prometheus, PromQLError, start_prometheus
from tests.support.upstream import Upstream

APP = "tests.apps.dashboard_app:app"
POOL_LABEL = "db_client_connection_pool_name"
LOAD_SECONDS = 20
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape interval, with margin
# Metrics whose probes are other issues, not on main yet: panels on them cannot return data
# until those land. (Remove an entry when its probe merges.)
AWAITING_PROBES: dict[str, str] = {}  # metric prefix -> the issue whose probe is not merged yet


def regex_value(value: str) -> str:
    """A variable value as Grafana puts it into a ``=~"..."`` matcher: regex-escaped, then
    backslashes doubled for the PromQL string."""
    return re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\1", value).replace("\\", "\\\\")


def substitute(expr: str, selection: dict[str, str | None], range_seconds: int) -> str:
    """Grafana's interpolation: a chosen value, or ``.*`` for All."""
    builtins = {"__rate_interval": RATE_INTERVAL, "__range": f"{range_seconds}s"}

    def one(match: re.Match) -> str:
        name = match.group(1)
        if name in builtins:
            return builtins[name]
        value = selection[name]
        return ".*" if value is None else regex_value(value)

    return VARIABLE.sub(one, expr)


@dataclass
class Failure:
    target: Target
    mode: str
    expr: str
    reason: str
    missing: list[str]  # metrics of the query that Prometheus has never seen

    @property
    def awaiting(self) -> set[str]:
        return {
            issue
            for name in self.missing
            for prefix, issue in AWAITING_PROBES.items()
            if name.startswith(prefix)
        }

    def __str__(self) -> str:
        missing = f" (missing metric: {', '.join(self.missing)})" if self.missing else ""
        return f"{self.target.name} [{self.mode}]: {self.reason}{missing}"


@dataclass
class LiveRun:
    failures: list[Failure] = field(default_factory=list)
    checked: int = 0
    selections: dict[str, dict[str, str | None]] = field(default_factory=dict)
    replica_labels: list[str] = field(default_factory=list)  # aggregated queries with instance
    prefer: dict[str, str] = field(default_factory=dict)
    prom: Prometheus | None = None
    range: tuple[float, float] = (0.0, 0.0)


async def drive(bases: list[str], seconds: float) -> None:
    """Healthy and unhealthy traffic at once: pools exhausted (timeouts, overflow), upstream
    queueing, connections closed by the upstream, invalidations, a blocked loop, 404s."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def get(url: str) -> None:
            async with session.get(url) as response:
                await response.read()

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = []
            for base in bases:
                batch += [get(f"{base}/db/sqlalchemy?hold=0.3") for _ in range(5)]
                batch += [get(f"{base}/db/asyncpg?hold=0.3") for _ in range(5)]
                batch += [get(f"{base}/upstream?delay=0.2") for _ in range(5)]
                batch += [get(f"{base}/upstream/httpx?delay=0.2") for _ in range(4)]
                batch += [
                    get(f"{base}/upstream?close=true"),
                    get(f"{base}/db/invalidate"),
                    get(f"{base}/items/7"),
                    get(f"{base}/no/such/path"),
                    get(f"{base}/block?seconds=0.15"),
                ]
            await asyncio.gather(*batch)
            await asyncio.sleep(0.2)


def resolve(prom, board: dict, start: float, end: float, mode: str, prefer: dict[str, str]):
    """Variable values as Grafana resolves them (chained ``label_values`` queries): all on All,
    or (drill-down) each set to a real value: ``prefer``'s where listed (the SQLAlchemy pool,
    which has every pool panel's series; the replica with workers), else the first."""
    selection: dict[str, str | None] = {}
    options: dict[str, list[str]] = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]).groups()
        selector = substitute(metric, selection, int(end - start))
        values = sorted({s[label] for s in prom.series(selector, start, end) if label in s})
        options[variable["name"]] = values
        if mode == "drill-down" and values:
            chosen = prefer.get(variable["name"], values[0])
            assert chosen in values, f"{chosen} is not a value of ${variable['name']}: {values}"
            selection[variable["name"]] = chosen
        else:
            selection[variable["name"]] = None
    return selection, options


def check_target(prom, run: LiveRun, target: Target, mode: str, selection, start, end, names):
    expr = substitute(target.expr, selection, int(end - start))
    run.checked += 1
    missing = sorted(set(METRIC.findall(target.expr)) - names)
    try:
        if target.instant:
            result = prom.query(expr, at=end)
            values = [float(r["value"][1]) for r in result]
        else:
            result = prom.query_range(expr, start, end)
            values = [float(v) for r in result for _, v in r["values"]]
    except PromQLError as exc:
        run.failures.append(Failure(target, mode, expr, f"query failed: {exc}", missing))
        return
    if not result:
        run.failures.append(Failure(target, mode, expr, "no series", missing))
    elif all(math.isnan(v) for v in values):
        run.failures.append(Failure(target, mode, expr, "only NaN", missing))
    elif mode == "all" and any("instance" in r["metric"] for r in result):
        run.replica_labels.append(target.name)


def last_all_up(prom: Prometheus, start: float, end: float, targets: int) -> float:
    """The last second at which every target's latest scrape succeeded. A failed scrape (1 s
    timeout, a busy machine) marks the target's gauges stale, and an instant query at that
    moment rightly shows nothing: the instant panels are judged as seen at a healthy moment."""
    points = prom.query_range("count(up == 1)", start, end)
    healthy = [ts for ts, value in points[0]["values"] if int(value) == targets] if points else []
    assert healthy, f"never all {targets} targets up between {start} and {end}"
    return float(healthy[-1])


def run_load(bases: list[str], seconds: float) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        try:
            asyncio.run(drive(bases, seconds))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    thread.join(timeout=seconds + 60)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def live(postgres, tmp_path_factory) -> Iterator[LiveRun]:
    """A fleet of tests/apps/dashboard_app.py (SQLAlchemy + asyncpg pools on PostgreSQL, an
    aiohttp session to a real upstream, a blocking route) under load: one replica with two
    uvicorn workers behind ``poolwatch exporter --postgres-dsn`` (``worker`` labels, the server
    view), one single-process replica. A real Prometheus scrapes both every second, labelled as
    Kubernetes would; then every target of every dashboard is run through its HTTP API, with
    the variables on All and drilled down to real values."""
    run = LiveRun()
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(Upstream())
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "ASYNCPG_DSN": postgres.dsn(),
            "UPSTREAM_URL": upstream.url,
            "POOLWATCH_LEAK_THRESHOLD": "0.25",
        }
        shared = str(tmp_path_factory.mktemp("multiproc"))
        workers = start_workers("uvicorn", APP, 2, env | {"POOLWATCH_MULTIPROC_DIR": shared})
        stack.callback(workers.stop)
        exporter = run_exporter(
            "--multiproc-dir",
            shared,
            "--postgres-dsn",
            postgres.dsn(password=False),
            env={"PGPASSWORD": PASSWORD},
        )
        stack.callback(exporter.stop)
        single = start_app(APP, env)
        stack.callback(single.stop)
        prom = start_prometheus(
            {"checkout-api": [f"127.0.0.1:{exporter.port}", f"127.0.0.1:{single.metrics_port}"]},
            [str(Path(REPO) / RULES_PATH)],  # the panels of the alerts' signals read the records
            labels={"namespace": "shop", "service": "checkout"},
        )
        stack.callback(prom.stop)
        prom.wait_for_targets(2)
        start = time.time()
        run_load([workers.url, single.url], LOAD_SECONDS)
        time.sleep(2)  # the last scrapes
        end = last_all_up(prom, start, time.time(), targets=2)
        names = prom.metric_names()
        run.prefer = {
            "instance": f"127.0.0.1:{exporter.port}",  # the replica that has workers
            "pool": prom.query("sqlalchemy_pool_overflow")[0]["metric"][POOL_LABEL],
        }
        for path in DASHBOARDS:
            board = load_dashboard(path)
            for mode in ("all", "drill-down"):
                selection, options = resolve(prom, board, start, end, mode, run.prefer)
                run.selections[f"{board['uid']} {mode}"] = selection
                for target in targets(board):
                    repeats = [None]
                    if target.repeat and mode == "all":  # one panel per value, as Grafana
                        repeats = options[target.repeat] or [None]
                    for value in repeats:
                        chosen = selection | ({target.repeat: value} if value else {})
                        check_target(prom, run, target, mode, chosen, start, end, names)
        run.prom, run.range = prom, (start, end)
        yield run


def test_panels_on_merged_probes_return_data(live):
    """Panels whose metrics are all exported by probes on main: no exceptions."""
    broken = [f for f in live.failures if not f.awaiting]
    assert live.checked > 100
    if broken:
        pytest.fail(f"{len(broken)} of {live.checked} queries:\n" + "\n".join(map(str, broken)))


def test_every_panel_query_returns_data(live):
    if live.failures:
        lines = "\n".join(map(str, live.failures))
        pytest.fail(f"{len(live.failures)} of {live.checked} queries:\n{lines}")


def test_variables_resolve_to_real_values_and_queries_aggregate_replicas(live):
    selection = live.selections[f"{UID['db']} drill-down"]
    assert selection["namespace"] == "shop" and selection["service"] == "checkout"
    assert selection["job"] == "checkout-api"
    assert selection["instance"] == live.prefer["instance"]
    assert selection["worker"] and selection["worker"].isdigit()  # a worker's pid
    assert selection["pool"] == live.prefer["pool"]
    # All is ".*": it matches the two workers of one replica and the replica without a worker
    # label alike, and the default view aggregates them: no series per replica.
    all_processes = substitute(
        'count(poolwatch_build_info{namespace=~"$namespace", job=~"$job", service=~"$service", '
        'instance=~"$instance", worker=~"$worker"})',
        dict.fromkeys(selection),
        0,
    )
    assert float(live.prom.query(all_processes, at=live.range[1])[0]["value"][1]) == 3
    assert not live.replica_labels, live.replica_labels


def test_fleet_budget_counts_every_replicas_pools_against_the_server(live, postgres):
    """Three processes (two workers + one single replica), each with a SQLAlchemy pool of max
    2 + 1 and an asyncpg pool of max 3: 18 connections against max_connections - reserved."""
    board = load_dashboard(Path(REPO) / "dashboards" / "database-pools.json")
    uid, panel_id = ALERT_PANELS["fleet_connection_budget"]
    assert uid == board["uid"]
    panel = next(p for p in board["panels"] if p["id"] == panel_id)
    result = live.prom.query(panel["targets"][0]["expr"], at=live.range[1])
    with psycopg.connect(postgres.dsn()) as conn:
        max_connections, reserved = (
            int(conn.execute(f"SHOW {name}").fetchone()[0])
            for name in ("max_connections", "superuser_reserved_connections")
        )
    assert [r["metric"] for r in result] == [
        {
            "__name__": RECORDS["fleet_connection_budget"],
            "server_address": postgres.host,
            "server_port": str(postgres.port),
        }
    ]
    assert float(result[0]["value"][1]) == pytest.approx(18 / (max_connections - reserved))
