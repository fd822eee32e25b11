"""The diagnosis probe: each of the guide's mistakes, committed on its own route of a real app
(uvicorn, PostgreSQL, a loopback upstream), is counted with its kind and logged once naming that
route's code; the same work done right, under concurrent load, is never flagged."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from poolwatch.config import ConfigError, load_settings
from poolwatch.probes.diagnosis import normalized
from tests.support import planted
from tests.support.upstream import Upstream

APP = "tests.apps.diagnosis_app:app"
KIND = "poolwatch_antipatterns_total"

# route -> (kind, the function the log line must name)
MISTAKES = {
    "/bad/engine": ("engine_per_request", "engine_per_request"),
    "/bad/asyncpg-pool": ("engine_per_request", "asyncpg_pool_per_request"),
    "/bad/aiohttp": ("client_per_request", "aiohttp_session_per_request"),
    "/bad/httpx": ("client_per_request", "httpx_client_per_request"),
    "/bad/sync": ("sync_db_on_loop", "sync_query_on_the_loop"),
    "/bad/n-plus-one": ("n_plus_one", "one_row"),
    "/bad/n-plus-one-literals": ("n_plus_one", "n_plus_one_literals"),
    "/bad/shared-session": ("shared_async_session", "one_row"),
    "/bad/swallow": ("swallowed_cancel", "swallows_cancel"),
}


@pytest.fixture
def diagnosed(postgres, app_server, tmp_path):
    def start(**env: str):
        upstream = Upstream().__enter__()
        server = app_server(
            APP,
            {
                "SA_URL": postgres.dsn("postgresql+asyncpg"),
                "ASYNCPG_DSN": postgres.dsn(),
                "SYNC_SA_URL": f"sqlite:///{tmp_path / 'sync.db'}",
                "UPSTREAM": f"{upstream.url}/slow?delay=0",
                "PLANTED_PARAMETER": planted.SQL_PARAMETER,
                "POOLWATCH_DIAGNOSE": "all",
                **env,
            },
        )
        started.append(upstream)
        return server

    started: list[Upstream] = []
    yield start
    for upstream in started:
        upstream.__exit__(None, None, None)


def counts(server) -> dict[str, float]:
    found: dict[str, float] = {}
    for sample in server.scrape().find(KIND):
        kind = sample.labels["kind"]
        found[kind] = found.get(kind, 0) + sample.value
    return found


async def load(url: str, paths: list[str], clients: int, rounds: int) -> None:
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in range(rounds):
                for path in paths:
                    async with session.get(url + path) as response:
                        assert response.status == 200, await response.text()

        await asyncio.gather(*(client() for _ in range(clients)))


async def test_each_mistake_is_flagged_on_its_route_and_the_right_code_never(diagnosed):
    server = diagnosed()
    ok = ["/ok/query/3", "/ok/batch", "/ok/cancel"]
    await load(server.url, ok, clients=8, rounds=10)  # the right way, concurrently
    assert set(counts(server).values()) == {0}, counts(server)
    for path in MISTAKES:
        await load(server.url, [path], clients=1, rounds=2)
    await load(server.url, ok, clients=4, rounds=3)
    found = counts(server)
    expected: dict[str, int] = {}
    for kind, _ in MISTAKES.values():
        expected[kind] = expected.get(kind, 0) + 2
    # shared_async_session: per overlapping call (at least one per request)
    assert found.pop("shared_async_session") >= 2
    expected.pop("shared_async_session")
    assert found == {**expected, "unclosed_pool": 0}, found
    log = server.log()
    for path, (kind, function) in MISTAKES.items():
        lines = [line for line in log.splitlines() if f"poolwatch: {kind}:" in line]
        assert any(f"diagnosis_app:{function}" in line for line in lines), (path, lines)
        assert any("diagnosis_app.py:" in line and "Fix:" in line for line in lines), lines
    # logged once per place: two requests per route, one line each
    assert log.count("poolwatch: engine_per_request:") == 2  # an engine and an asyncpg pool
    assert "SELECT CAST(? AS int), CAST(? AS text)" in log  # the statement, normalized
    assert planted.SQL_PARAMETER not in log  # never a parameter value
    # queries per request, by route
    samples = server.scrape()
    n1 = samples.value("poolwatch_http_server_request_queries_sum", http_route="/bad/n-plus-one")
    assert 24 <= n1 <= 24 + 8  # 12 per request (+ a new connection's set-up queries)
    assert (
        samples.value("poolwatch_http_server_request_queries_count", http_route="/bad/n-plus-one")
        == 2
    )
    none = {"http_route": "/bad/swallow"}  # requests without a query count too, at 0
    assert samples.value("poolwatch_http_server_request_queries_count", **none) == 2
    assert samples.value("poolwatch_http_server_request_queries_sum", **none) == 0
    assert samples.bucket("poolwatch_http_server_request_queries", "0.001", **none) == 2
    batch = samples.value("poolwatch_http_server_request_queries_count", http_route="/ok/batch")
    assert batch == 8 * 10 + 4 * 3


def test_unclosed_pools_are_named_where_they_were_made(diagnosed):
    server = diagnosed(LEAVE_OPEN="1")
    asyncio.run(load(server.url, ["/ok/query/1"], clients=1, rounds=1))
    server.stop()
    log = server.log()
    lines = [line for line in log.splitlines() if "poolwatch: unclosed_pool:" in line]
    assert len(lines) == 2, log
    assert any("SQLAlchemy engine 127.0.0.1:" in line for line in lines)
    assert any("aiohttp.client.ClientSession" in line for line in lines)
    assert all("diagnosis_app:lifespan" in line and "diagnosis_app.py:" in line for line in lines)
    assert planted.DB_PASSWORD not in log


def test_a_clean_shutdown_and_detectors_turned_off_say_nothing(diagnosed):
    server = diagnosed(POOLWATCH_DIAGNOSE="-n_plus_one,-client_per_request")
    asyncio.run(load(server.url, ["/bad/n-plus-one", "/bad/aiohttp", "/bad/engine"], 1, 1))
    found = counts(server)
    assert "n_plus_one" not in found and "client_per_request" not in found
    assert found["engine_per_request"] == 1
    server.stop()
    assert "unclosed_pool" not in server.log()


def test_statements_are_normalized_without_their_values():
    assert normalized("SELECT * FROM t WHERE id = 42 AND name = 'x''y'") == (
        "SELECT * FROM t WHERE id = ? AND name = ?"
    )
    assert normalized("SELECT a FROM t1 WHERE id IN (1, 2, 3) AND b = $1") == (
        "SELECT a FROM t1 WHERE id IN (?) AND b = ?"
    )
    assert normalized("UPDATE t SET x = :x WHERE y = %(y)s") == "UPDATE t SET x = ? WHERE y = ?"


def test_settings():
    assert "swallowed_cancel" not in load_settings({}).diagnose
    assert load_settings({"diagnose": "off"}).diagnose == frozenset()
    assert load_settings({"diagnose": False}).diagnose == frozenset()
    assert "swallowed_cancel" in load_settings({"diagnose": "all"}).diagnose
    assert load_settings({}, {"POOLWATCH_DIAGNOSE": "n_plus_one"}).diagnose == {"n_plus_one"}
    with pytest.raises(ConfigError, match=re.escape("POOLWATCH_DIAGNOSE='n_plus_two'")):
        load_settings({}, {"POOLWATCH_DIAGNOSE": "n_plus_two"})
    with pytest.raises(ConfigError, match="POOLWATCH_N_PLUS_ONE"):
        load_settings({}, {"POOLWATCH_N_PLUS_ONE": "1"})


@pytest.mark.parametrize(
    ("where", "method"),
    [
        ("sqlalchemy.engine:Connection", "_exec_single_context"),
        ("asyncpg.connection:Connection", "_execute"),
    ],
)
async def test_a_renamed_statement_hook_leaves_that_detector_out(
    clean_agent, monkeypatch, postgres, where, method
):
    """The statement hooks are private: a release that renamed one leaves N+1 and queries per
    request out (one counted error, one line); the app's queries work, the other detectors run."""
    import asyncpg
    import structlog
    from sqlalchemy.ext.asyncio import create_async_engine

    import poolwatch
    from poolwatch._log import errors
    from tests.test_hook_guards import _class, renamed

    cls = _class(where)
    renamed(monkeypatch, cls, method)
    counted = errors.counts["diagnosis"]
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)
    lines = [e for e in logs if e.get("probe") == "diagnosis"]
    assert len(lines) == 1 and f"{cls.__qualname__}.{method} is missing" in lines[0]["event"]
    assert "part of the diagnosis probe is off" in lines[0]["event"]
    assert errors.counts["diagnosis"] == counted + 1
    assert clean_agent.diagnosis is not None  # the other detectors run
    engine = create_async_engine(postgres.dsn("postgresql+asyncpg"))
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("select 41 + 1")).scalar() == 42
    await engine.dispose()
    pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=1)
    assert await pool.fetchval("select 41 + 1") == 42
    await pool.close()


def test_the_existing_pool_app_under_load_is_never_flagged(postgres, app_server):
    """Every pool kind the suite's apps use, right, under concurrent load (sync endpoints in the
    thread pool included), and shut down cleanly: nothing is flagged, every detector on."""
    env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "SYNC_SA_URL": postgres.dsn("postgresql+psycopg"),
        "ASYNCPG_DSN": postgres.dsn(),
        "POOL_SIZE": "4",
        "POOL_TIMEOUT": "5",
        "POOLWATCH_DIAGNOSE": "all",
    }
    server = app_server("tests.apps.pool_app:app", env)
    paths = ["/sa/hold?seconds=0.01", "/sync/hold?seconds=0.01", "/apg/hold?seconds=0.01"]
    asyncio.run(load(server.url, [*paths, "/sa/query", "/apg/query", "/ok"], 6, 5))
    assert set(counts(server)) == set(MISTAKE_KINDS) and set(counts(server).values()) == {0}
    server.stop()
    assert "poolwatch: " not in "".join(
        line for line in server.log().splitlines() if "antipattern=" in line
    )


MISTAKE_KINDS = {kind for kind, _ in MISTAKES.values()} | {"unclosed_pool"}
