"""``poolwatch top`` and ``poolwatch advise`` read the redis, psycopg_pool and httpx series of a
real agent (real redis-server, PostgreSQL, a loopback upstream)."""

from __future__ import annotations

import asyncio

import poolwatch
from poolwatch.cli import advise
from poolwatch.cli.scrape import parse
from tests.support.net import get
from tests.support.upstream import Upstream


async def test_top_and_advise_tell_the_pools_apart(redis_server, postgres, agent):
    import httpx
    import redis.asyncio
    from psycopg_pool import AsyncConnectionPool

    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    client = redis.asyncio.Redis.from_url(redis_server.url(7), max_connections=4)
    pg = AsyncConnectionPool(postgres.dsn(), min_size=1, max_size=3, open=False)
    await pg.open(wait=True)

    async def pg_hold() -> None:
        async with pg.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.05)")

    first = parse(get(url))
    with Upstream() as upstream:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2)) as http:
            poolwatch.watch_httpx_client(http, name="top")  # its own group: its limit alone
            await asyncio.gather(
                *(client.blpop(["poolwatch-test-empty"], timeout=0.05) for _ in range(4)),
                *(pg_hold() for _ in range(6)),
                *(http.get(f"{upstream.url}/slow?delay=0.05") for _ in range(4)),
            )
            last = parse(get(url))
        host = f"127.0.0.1:{upstream.port} (httpx top)"
    assert last.hosts[host].limit == 2 and last.hosts[host].idle == 2  # top's host row
    assert last.hosts[host].wait_buckets  # its wait p99 column

    observations = {o.pool: o for o in advise.from_snapshots(first, last, [last], 1.0)}
    redis_pool = observations[f"127.0.0.1:{redis_server.port}/7"]
    psycopg = observations[f"127.0.0.1:{postgres.port}/app"]
    assert (redis_pool.kind, psycopg.kind) == ("redis", "psycopg_pool")
    assert redis_pool.checkouts == 4 and psycopg.checkouts == 6
    lines = "\n".join(advise.report([redis_pool, psycopg], "test"))
    assert "(redis, 1 process), now max 4" in lines and "max_connections=" in lines
    assert "(psycopg_pool, 1 process), now max 3" in lines and "max_size=" in lines
    await client.aclose()
    await pg.close()
