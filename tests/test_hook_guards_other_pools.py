"""The guards of tests/test_hook_guards.py for the httpx, redis and psycopg_pool probes. Their
only private hooks are optional ones (the rest are the libraries' public methods): a release
that renamed one leaves that series out, with one counted error and one log line, and the pool
or client works as without poolwatch (real redis-server, PostgreSQL, a loopback upstream)."""

from __future__ import annotations

import pytest
import structlog

import poolwatch
from poolwatch._log import errors
from poolwatch.testing import snapshot
from tests.support.upstream import Upstream
from tests.test_hook_guards import _class, renamed

POOL = "db_client_connection_pool_name"
# (probe, "module:Class", method it hooks, the series it records)
HOOKS = [
    (
        "httpx",
        "httpcore._async.connection_pool:AsyncPoolRequest",
        "wait_for_connection",
        "httpx_client_connection_wait_time_seconds_count",
    ),
    ("psycopg_pool", "psycopg_pool:AsyncConnectionPool", "_connect", "create_time"),
    ("redis", "redis.asyncio.connection:ConnectionPool", "make_connection", "create_time"),
]


async def use(probe: str, postgres, redis_server, upstream) -> tuple:
    """The library used as an app would; returns (the series while open, the pool's label)."""
    if probe == "httpx":
        import httpx

        async with httpx.AsyncClient() as client:
            response = await client.get(f"{upstream.url}/slow?delay=0")
            assert response.json() == {"ok": True}
            return snapshot(), {"server_port": str(upstream.port)}
    if probe == "psycopg_pool":
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(postgres.dsn(), min_size=1, open=False) as pool:
            async with pool.connection() as conn:
                assert (await (await conn.execute("select 41 + 1")).fetchone()) == (42,)
            return snapshot(), {POOL: f"127.0.0.1:{postgres.port}/app"}
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url(6))
    assert await client.ping()
    seen = snapshot()
    await client.aclose()
    return seen, {POOL: f"127.0.0.1:{redis_server.port}/6"}


@pytest.mark.parametrize(("probe", "where", "method", "series"), HOOKS)
async def test_a_renamed_optional_hook_leaves_one_series_out(
    clean_agent, monkeypatch, postgres, redis_server, probe, where, method, series
):
    cls = _class(where)
    renamed(monkeypatch, cls, method)
    counted = errors.counts[probe]
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)  # does not raise
    lines = [e for e in logs if e.get("probe") == probe]
    assert len(lines) >= 1 and f"{cls.__qualname__}.{method} is missing" in lines[0]["event"]
    assert clean_agent.probe(probe) is not None  # the probe is on
    with Upstream() as upstream:
        seen, label = await use(probe, postgres, redis_server, upstream)
    assert errors.counts[probe] >= counted + 1
    if probe == "httpx":
        assert not seen.find(series)
        assert seen.find("http_client_open_connections", **label)  # the others measured
    else:
        assert not seen.find("db_client_connection_create_time_seconds_count", **label)
        assert seen.value("db_client_connection_wait_time_seconds_count", **label) >= 1
