"""The other pools of a FastAPI service: redis-py, psycopg_pool and httpx, on real servers.

Debian's redis-server (with a password), PostgreSQL and a loopback HTTP upstream; each pool
(max 3 connections) saturated by concurrent requests through a real uvicorn app, then in-process
with hundreds of cancellations at random points.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from tests.support import planted
from tests.support.apps import REPO
from tests.support.load import Sampler, burst
from tests.support.net import scrape
from tests.support.upstream import Upstream

APP = "tests.apps.other_pools_app:app"
POOL = "db_client_connection_pool_name"
WAIT, USE = "db_client_connection_wait_time_seconds", "db_client_connection_use_time_seconds"
TIMEOUTS = "db_client_connection_timeouts_total"


def redis_url(redis_server, user: bool = False) -> str:
    """The app appends the db index."""
    return redis_server.url(0, user=user)[:-1]


def delta(before, after, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def saturate_db_pool(server, route: str, pool: dict[str, str], n: int = 15) -> None:
    """``n`` concurrent requests hold one of 3 connections for 0.2 s; the pool waits 0.5 s:
    waves 1-3 get one, the rest time out. Every figure is checked against the statuses."""
    before = server.scrape()
    assert before.value("db_client_connection_max", **pool) == 3
    with Sampler(server.metrics_url) as sampler:
        statuses = await burst(f"{server.url}{route}?seconds=0.2", n)
    after = server.scrape()
    ok, refused = statuses.count(200), statuses.count(503)
    assert ok + refused == n and ok >= 6 and refused >= 1, statuses
    used = {"db_client_connection_state": "used", **pool}
    assert sampler.max("db_client_connection_count", **used) == 3  # peak used = max
    assert sampler.max("db_client_connection_pending_requests", **pool) > 0
    assert delta(before, after, TIMEOUTS, **pool) == refused  # failed for want of a connection
    assert delta(before, after, f"{WAIT}_count", **pool) == ok  # one wait per checkout
    assert delta(before, after, f"{USE}_count", **pool) == ok
    assert after.value("db_client_connection_count", **used) == 0  # all back
    assert after.value("db_client_connection_pending_requests", **pool) == 0
    assert after.bucket(WAIT, "0.1", **pool) < after.value(f"{WAIT}_count", **pool)  # waited


async def test_redis_blocking_pool_saturated(redis_server, app_server):
    server = app_server(APP, {"REDIS_URL": redis_url(redis_server)})
    pool = {POOL: f"127.0.0.1:{redis_server.port}/2"}  # host:port/db, never the password
    await saturate_db_pool(server, "/redis/hold", pool)
    samples = server.scrape()
    assert samples.value("db_client_connection_create_time_seconds_count", **pool) == 3
    assert samples.value("db_client_connection_count", db_client_connection_state="idle", **pool)


async def test_redis_default_pool_refusals_count_as_timeouts(redis_server, app_server):
    """The pool made before instrument(): its MaxConnectionsError are the timeouts."""
    server = app_server(APP, {"REDIS_URL": redis_url(redis_server, user=True)})
    pool = {POOL: f"127.0.0.1:{redis_server.port}/1"}
    before = server.scrape()
    with Sampler(server.metrics_url) as sampler:
        statuses = await burst(f"{server.url}/redis/hold?seconds=0.3&early=true", 10)
    after = server.scrape()
    ok, refused = statuses.count(200), statuses.count(503)
    assert ok == 3 and refused == 7, statuses  # it refuses at once: only the first 3 get one
    used = {"db_client_connection_state": "used", **pool}
    assert sampler.max("db_client_connection_count", **used) == 3
    assert delta(before, after, TIMEOUTS, **pool) == refused
    assert delta(before, after, f"{WAIT}_count", **pool) == ok
    assert after.value("db_client_connection_count", **used) == 0
    assert planted.REDIS_USER not in after.text and planted.REDIS_PASSWORD not in after.text


async def test_psycopg_pool_saturated(postgres, app_server):
    server = app_server(APP, {"PG_DSN": postgres.dsn()})
    pool = {POOL: f"127.0.0.1:{postgres.port}/app"}
    await saturate_db_pool(server, "/pg/hold", pool)
    samples = server.scrape()
    assert samples.value("db_client_connection_idle_min", **pool) == 1
    assert samples.value("db_client_connection_create_time_seconds_count", **pool) >= 3


async def test_httpx_pool_saturated(app_server):
    """An AsyncClient limited to 3 connections, 9 requests of 0.7 s, 0.5 s pool timeout: the
    first 3 get a connection, the 6 others wait 0.5 s for one and fail (httpx.PoolTimeout)."""
    with Upstream() as upstream:
        server = app_server(APP, {"UPSTREAM_URL": upstream.url})
        host = {"server_address": "127.0.0.1", "server_port": str(upstream.port)}
        client = {"httpx_client_name": "default"}
        active = {"http_connection_state": "active", "url_scheme": "http", **host, **client}
        await burst(f"{server.url}/httpx/get?delay=0", 1)  # the host is known: series at zero
        before = server.scrape()
        assert before.value("httpx_client_connection_limit", scope="total", **client) == 3
        with Sampler(server.metrics_url) as sampler:
            statuses = await burst(f"{server.url}/httpx/get?delay=0.7", 9)
        after = server.scrape()
    ok, refused = statuses.count(200), statuses.count(503)
    assert ok == 3 and refused == 6, statuses
    assert sampler.max("http_client_open_connections", **active) == 3  # peak active = limit
    assert sampler.max("httpx_client_pending_requests", **host, **client) > 0
    timeouts = after.find("httpx_client_errors_total", error_type="PoolTimeout", **host)
    assert sum(s.value for s in timeouts) == refused
    assert delta(before, after, "httpx_client_connection_wait_time_seconds_count", **host) == ok
    assert after.value("http_client_open_connections", **active) == 0
    assert after.value("httpx_client_pending_requests", **host, **client) == 0


def test_passwords_never_in_metrics_or_logs(redis_server, postgres, app_server):
    server = app_server(
        APP, {"REDIS_URL": redis_url(redis_server, user=True), "PG_DSN": postgres.dsn()}
    )
    text = server.scrape().text
    assert f'pool_name="127.0.0.1:{redis_server.port}/1"' in text
    assert f'pool_name="127.0.0.1:{redis_server.port}/2"' in text
    assert f'pool_name="127.0.0.1:{postgres.port}/app"' in text
    server.stop()
    for secret in (planted.REDIS_PASSWORD, planted.REDIS_USER, planted.DB_PASSWORD):
        assert secret not in text and secret not in server.log()


# --- in process: cancellations at random points leave every count exact ------------------------
async def cancel_at_random(work, n: int, seed: int, may_all_cancel: bool = False) -> int:
    """``n`` tasks of ``work()``, each cancelled at a random point of 0-0.3 s; returns how
    many completed (``may_all_cancel``: none need to)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(work(rng)) for _ in range(n)]
    for task in tasks:
        loop.call_later(rng.uniform(0, 0.3), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled > 0 and (may_all_cancel or cancelled < n)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    return n - cancelled


def assert_pool_at_rest(agent, pool: dict[str, str], checkouts: int) -> None:
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert samples.value("db_client_connection_pending_requests", **pool) == 0
    used = {"db_client_connection_state": "used", **pool}
    assert samples.value("db_client_connection_count", **used) == 0
    assert samples.value(f"{WAIT}_count", **pool) == checkouts
    assert samples.value(f"{USE}_count", **pool) == checkouts


async def test_cancelled_redis_checkouts_leave_counts_exact(redis_server, agent):
    import redis
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        redis_server.url(3), max_connections=3, timeout=5
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    done = 0
    # redis-py < 5.3 requires a command name, later releases deprecate passing one
    release = tuple(int(part) for part in redis.__version__.split(".")[:2])
    args = ("PING",) if release < (5, 3) else ()

    async def work(rng: random.Random) -> None:
        nonlocal done
        connection = await pool.get_connection(*args)
        try:
            done += 1
            await asyncio.sleep(rng.uniform(0, 0.02))
        finally:
            await pool.release(connection)

    await cancel_at_random(work, 300, seed=20261207)
    await asyncio.sleep(0.1)  # releases cancelled mid-way finish in background tasks
    assert_pool_at_rest(agent, {POOL: f"127.0.0.1:{redis_server.port}/3"}, done)
    await client.aclose()


async def test_cancelled_psycopg_checkouts_leave_counts_exact(postgres, agent):
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(postgres.dsn(), min_size=0, max_size=3, timeout=5, open=False)
    await pool.open()
    done = 0

    async def work(rng: random.Random) -> None:
        nonlocal done
        async with pool.connection() as conn:
            done += 1
            await asyncio.sleep(rng.uniform(0, 0.02))
            await conn.execute("SELECT 1")

    await cancel_at_random(work, 300, seed=7)
    await asyncio.sleep(0.2)
    assert_pool_at_rest(agent, {POOL: f"127.0.0.1:{postgres.port}/app"}, done)
    await pool.close()
    later = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert not later.find("db_client_connection_count", **{POOL: f"127.0.0.1:{postgres.port}/app"})


async def test_cancelled_httpx_requests_leave_counts_exact(agent):
    import httpx

    answered = 0

    async def response_received(response) -> None:
        """httpx's response hook: the pool handed the request a connection and the upstream's
        headers came back (a cancel may still hit the body's read, after the checkout)."""
        nonlocal answered
        answered += 1

    with Upstream() as upstream:
        limits, hooks = httpx.Limits(max_connections=3), {"response": [response_received]}
        async with httpx.AsyncClient(limits=limits, event_hooks=hooks) as client:
            await check_cancelled_httpx_requests(agent, upstream, client, lambda: answered)


async def check_cancelled_httpx_requests(agent, upstream, client, answered) -> None:
    async def work(rng: random.Random) -> None:
        await client.get(f"{upstream.url}/slow?delay={rng.uniform(0, 0.02):.3f}")

    # httpcore's pool may hang for good after cancellations (connections left "CONNECTING"
    # take every slot), poolwatch or not: then no request completes, and the counts must say so
    await cancel_at_random(work, 200, seed=11, may_all_cancel=True)
    await asyncio.sleep(0.1)
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    host = {"server_address": "127.0.0.1", "server_port": str(upstream.port)}
    assert samples.value("httpx_client_pending_requests", **host) == 0
    # what httpcore's pool itself holds: it may keep the connection of a cancelled request
    # active for good (its own repr says "1 active" then, without poolwatch too)
    held = client._transport._pool.connections
    for state, in_state in (
        ("active", lambda c: not c.is_idle() and c.info() != "CONNECTING"),
        ("idle", lambda c: c.is_idle()),
    ):
        expected = sum(in_state(c) and not c.is_closed() for c in held)
        labels = {"http_connection_state": state, **host}
        assert samples.value("http_client_open_connections", **labels) == expected
    assert samples.value("httpx_client_connection_wait_time_seconds_count", **host) == answered()
    assert not samples.find("httpx_client_errors_total", **host)  # a cancel is no error


# --- the sync clients, from threads ---------------------------------------------------------------
def run_threads(work, n: int) -> list:
    results: list = []

    def run() -> None:
        try:
            work()
            results.append("ok")
        except Exception as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_sync_redis_and_psycopg_pools_from_threads(redis_server, postgres, agent):
    import redis
    from psycopg_pool import ConnectionPool

    rpool = redis.BlockingConnectionPool.from_url(
        redis_server.url(4), max_connections=3, timeout=0.3
    )
    client = redis.Redis(connection_pool=rpool)
    pg = ConnectionPool(postgres.dsn(), min_size=1, max_size=3, timeout=0.3, open=True)

    def pg_hold() -> None:
        with pg.connection() as conn:
            conn.execute("SELECT pg_sleep(0.2)")

    by_pool = {
        f"127.0.0.1:{redis_server.port}/4": (
            run_threads(lambda: client.blpop(["poolwatch-test-empty"], timeout=0.2), 10),
            "ConnectionError",
        ),
        f"127.0.0.1:{postgres.port}/app": (run_threads(pg_hold, 10), "PoolTimeout"),
    }
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    for name, (results, timeout) in by_pool.items():
        label = {POOL: name}
        assert set(results) == {"ok", timeout}, results
        assert samples.value(TIMEOUTS, **label) == results.count(timeout)
        assert samples.value(f"{WAIT}_count", **label) == results.count("ok")
        used = {"db_client_connection_state": "used", **label}
        assert samples.value("db_client_connection_count", **used) == 0
    client.close()
    pg.close()


def test_sync_httpx_client_from_threads(agent):
    import httpx

    import poolwatch

    with Upstream() as upstream, httpx.Client(limits=httpx.Limits(max_connections=2)) as client:
        poolwatch.watch_httpx_client(client, name="sync")
        results = run_threads(lambda: client.get(f"{upstream.url}/slow?delay=0.1"), 6)
        samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert results == ["ok"] * 6
    labels = {"httpx_client_name": "sync", "server_port": str(upstream.port)}
    assert samples.value("httpx_client_connection_wait_time_seconds_count", **labels) == 6
    # 6 requests on 2 connections: 4 queued, waiting ~0.1 s and ~0.2 s
    assert samples.bucket("httpx_client_connection_wait_time_seconds", "0.05", **labels) == 2
    assert (
        samples.value("httpx_client_connection_limit", scope="total", httpx_client_name="sync") == 2
    )


@pytest.mark.parametrize(
    "groups", [["CONNECTION_BASIC"], ["CONNECTION_BASIC", "CONNECTION_ADVANCED"]]
)
def test_beside_redis_py_own_metrics_no_figure_twice(redis_server, groups):
    """redis-py >= 7.2 records the connection count and create time (CONNECTION_BASIC), the
    timeouts and wait time (CONNECTION_ADVANCED) itself once its observability is on: poolwatch
    leaves those out for redis pools and keeps what redis-py does not record. In a process of
    its own: redis-py needs the global MeterProvider, which can be set once per process."""
    pytest.importorskip("redis.observability")
    run = subprocess.run(
        [sys.executable, "-m", "tests.apps.redis_otel_check", redis_server.url(5), *groups],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "agent")])},
    )  # fmt: skip
    planted.scan(run.stdout + run.stderr, "the output of tests.apps.redis_otel_check")
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    poolwatch, redis_py = set(found["poolwatch"]), set(found["redis_py"])
    assert "db.client.connection.count" in redis_py  # redis-py's own, recorded
    assert not poolwatch & {"db_client_connection_count", "db_client_connection_create_time"}
    advanced = "CONNECTION_ADVANCED" in groups
    assert ("db_client_connection_wait_time" in poolwatch) is not advanced
    assert ("db_client_connection_timeouts" in poolwatch) is not advanced
    # what redis-py does not record, poolwatch still does
    assert {"db_client_connection_max", "db_client_connection_use_time"} <= poolwatch


# --- downstream: the sidecar of several workers, OTLP -------------------------------------------
async def test_the_sidecar_and_otlp_carry_the_new_pools(redis_server, postgres, tmp_path):
    """Two uvicorn workers behind ``poolwatch exporter`` (one target, a ``worker`` label each),
    and one process pushing OTLP: both carry the redis, psycopg and httpx series."""
    from tests.support.apps import start_app
    from tests.support.exporter import run_exporter, start_workers
    from tests.support.otlp import OtlpReceiver, attributes, instruments
    from tests.test_otlp import otlp_env

    with Upstream() as upstream:
        env = {
            "REDIS_URL": redis_url(redis_server),
            "PG_DSN": postgres.dsn(),
            "UPSTREAM_URL": upstream.url,
        }
        routes = ["/redis/hold?seconds=0.05", "/pg/hold?seconds=0.05", "/httpx/get?delay=0"]
        directory = str(tmp_path / "multiproc")
        workers = start_workers("uvicorn", APP, 2, env | {"POOLWATCH_MULTIPROC_DIR": directory})
        exporter = run_exporter("--multiproc-dir", directory)
        try:
            for route in routes:
                assert set(await burst(f"{workers.url}{route}", 6)) == {200}
            samples = exporter.scrape()
        finally:
            workers.stop()
            exporter.stop()
        for pool in (f"127.0.0.1:{redis_server.port}/2", f"127.0.0.1:{postgres.port}/app"):
            assert len(samples.find("db_client_connection_max", **{POOL: pool})) == 2  # workers
        assert samples.find("httpx_client_connection_limit", scope="total")

        async with OtlpReceiver() as receiver:
            server = start_app(APP, {**env, **otlp_env(receiver.url)})
            try:
                for route in routes:
                    assert set(await burst(f"{server.url}{route}", 3)) == {200}
                found = instruments(await receiver.export_after(time.monotonic()))
            finally:
                server.stop()
    pools = {
        attributes(point.attributes).get("db.client.connection.pool.name")
        for point in found["db.client.connection.max"][1].sum.data_points
    }
    assert {f"127.0.0.1:{redis_server.port}/2", f"127.0.0.1:{postgres.port}/app"} <= pools
    assert "httpx.client.connection.wait_time" in found
    assert "httpx.client.pending_requests" in found


# --- httpx: mounts, and a private figure a release would keep elsewhere -------------------------
async def test_httpx_mounted_transports_are_measured(clean_agent):
    import httpx

    import poolwatch
    from poolwatch.testing import snapshot

    poolwatch.instrument(metrics_port=0)
    with Upstream() as upstream, Upstream() as other:
        mounted = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=7))
        client = httpx.AsyncClient(mounts={f"http://127.0.0.1:{other.port}": mounted})
        poolwatch.watch_httpx_client(client, name="api")
        for url in (upstream.url, other.url):
            assert (await client.get(f"{url}/slow?delay=0")).status_code == 200
        seen = snapshot()
        await client.aclose()
    limits = seen.find("httpx_client_connection_limit", httpx_client_name="api", scope="total")
    assert sorted(s.value for s in limits) == [107.0]  # 100 (the default) + 7 (the mount's)
    for port in (upstream.port, other.port):
        idle = {"http_connection_state": "idle", "server_port": str(port)}
        assert seen.value("http_client_open_connections", httpx_client_name="api", **idle) == 1


async def test_httpx_figure_kept_elsewhere_is_left_out_and_counted_once(clean_agent):
    import httpx

    import poolwatch
    from poolwatch.testing import snapshot

    poolwatch.instrument(metrics_port=0)
    errors = snapshot().value("poolwatch_agent_errors_total", probe="httpx")
    with Upstream() as upstream:
        async with httpx.AsyncClient() as client:
            await client.get(f"{upstream.url}/slow?delay=0")
            pool = client._transport._pool
            requests, pool._requests = pool._requests, None  # as if a release moved them
            try:
                first, second = snapshot(), snapshot()
            finally:
                pool._requests = requests
    host = {"server_port": str(upstream.port)}
    assert not first.find("httpx_client_pending_requests", **host)  # not exported, no crash
    assert first.value("http_client_open_connections", http_connection_state="idle", **host) == 1
    assert second.value("poolwatch_agent_errors_total", probe="httpx") == errors + 1  # once
