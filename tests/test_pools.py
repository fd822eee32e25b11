"""Issue 2: pool metrics from real apps under uvicorn, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.support.load import Sampler, burst
from tests.support.net import get
from tests.support.postgres import PASSWORD

APP = "tests.apps.pool_app:app"
HIST = (
    "db_client_connection_wait_time_seconds_count",
    "db_client_connection_use_time_seconds_count",
)


EXHAUST = {"POOL_SIZE": "2", "MAX_OVERFLOW": "1", "POOL_TIMEOUT": "0.5"}


def pool_label(postgres, suffix: str = "") -> dict[str, str]:
    return {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app{suffix}"}


async def exhaust_and_check(server, route: str, pool: dict[str, str]) -> None:
    """15 concurrent requests hold a connection for 0.15 s on a pool of max 3, timeout 0.5 s:
    waves 2 and 3 wait ~0.15 s and ~0.3 s and get one, wave 5 (~0.6 s) times out."""
    before = server.scrape()
    assert before.value("db_client_connection_max", **pool) == 3
    with Sampler(server.metrics_url) as sampler:
        statuses = await burst(f"{server.url}{route}?seconds=0.15", 15)
    after = server.scrape()
    ok, timed_out = statuses.count(200), statuses.count(503)
    assert ok + timed_out == 15 and ok >= 9 and timed_out >= 1, statuses

    used = dict(db_client_connection_state="used", **pool)
    assert sampler.max("db_client_connection_count", **used) == 3  # used reached max
    assert sampler.max("db_client_connection_pending_requests", **pool) > 0
    delta = {n: after.value(n, **pool) - before.value(n, **pool) for n in HIST}
    assert delta[HIST[0]] == ok  # every successful checkout waited (and was timed)
    assert delta[HIST[1]] == ok  # ...and was returned
    timeouts = after.value("db_client_connection_timeouts_total", **pool)
    assert timeouts - before.value("db_client_connection_timeouts_total", **pool) == timed_out
    # waiting for a held connection shows in the histogram: some waits exceeded 0.1 s
    assert after.bucket("db_client_connection_wait_time_seconds", "0.1", **pool) < after.value(
        HIST[0], **pool
    )
    assert after.value("db_client_connection_count", **used) == 0
    assert after.value("db_client_connection_pending_requests", **pool) == 0


async def test_sqlalchemy_async_pool_exhaustion(postgres, app_server):
    server = app_server(APP, {"SA_URL": postgres.dsn("postgresql+asyncpg"), **EXHAUST})
    await exhaust_and_check(server, "/sa/hold", pool_label(postgres))
    assert server.scrape().value("sqlalchemy_pool_overflow", **pool_label(postgres)) <= 1


async def test_asyncpg_pool_exhaustion(postgres, app_server):
    server = app_server(APP, {"ASYNCPG_DSN": postgres.dsn(), **EXHAUST})
    await exhaust_and_check(server, "/apg/hold", pool_label(postgres))
    samples = server.scrape()
    assert samples.value("db_client_connection_idle_min", **pool_label(postgres)) == 1
    assert (
        samples.value("db_client_connection_create_time_seconds_count", **pool_label(postgres)) >= 3
    )


async def test_sync_engine_used_from_threads(postgres, app_server):
    server = app_server(APP, {"SYNC_SA_URL": postgres.dsn("postgresql+psycopg"), **EXHAUST})
    await exhaust_and_check(server, "/sync/hold", pool_label(postgres))


def test_password_never_in_metrics_or_logs(postgres, app_server):
    server = app_server(
        APP,
        {"SA_URL": postgres.dsn("postgresql+asyncpg"), "ASYNCPG_DSN": postgres.dsn()},
    )
    assert get(f"{server.url}/sa/hold?seconds=0") and get(f"{server.url}/apg/hold?seconds=0")
    text = server.scrape().text
    # both pools on one database: distinct names, creation order
    assert f'pool_name="127.0.0.1:{postgres.port}/app"' in text
    assert f'pool_name="127.0.0.1:{postgres.port}/app#2"' in text
    server.stop()
    assert PASSWORD not in text and "postgres@" not in text
    assert PASSWORD not in server.log()


def test_metrics_answer_while_the_loop_is_blocked(app_server):
    server = app_server(APP)
    blocker = threading.Thread(target=get, args=(f"{server.url}/block?seconds=1",))
    blocker.start()
    time.sleep(0.3)  # the loop is now inside time.sleep(1)
    started = time.perf_counter()
    server.scrape(timeout=2)
    elapsed = time.perf_counter() - started
    blocker.join()
    assert elapsed < 0.1, f"/metrics took {elapsed * 1000:.0f} ms during a blocked loop"


async def test_cancelled_acquires_leave_counts_exact(postgres, agent):
    import random

    import asyncpg

    from tests.support.net import scrape

    pool = await asyncpg.create_pool(postgres.dsn(), min_size=0, max_size=3)
    rng = random.Random(20261124)
    acquired = 0

    async def worker() -> None:
        nonlocal acquired
        async with pool.acquire() as conn:
            acquired += 1
            await asyncio.sleep(rng.uniform(0, 0.02))
            await conn.fetchval("SELECT 1")

    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(worker()) for _ in range(300)]
    for task in tasks:
        loop.call_later(rng.uniform(0, 0.3), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert 0 < cancelled < 300
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)

    await asyncio.sleep(0.2)  # asyncpg finishes releases of cancelled holders in shielded tasks
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    label = pool_label(postgres)
    assert samples.value("db_client_connection_pending_requests", **label) == 0
    assert (
        samples.value("db_client_connection_count", db_client_connection_state="used", **label) == 0
    )
    assert samples.value("db_client_connection_wait_time_seconds_count", **label) == acquired
    assert samples.value("db_client_connection_use_time_seconds_count", **label) == acquired
    await pool.close()
    later = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert not later.find("db_client_connection_count", **label)  # a closed pool disappears


async def test_cancelled_sqlalchemy_checkouts_leave_counts_exact(postgres, agent):
    import random

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.support.net import scrape

    engine = create_async_engine(postgres.dsn("postgresql+asyncpg"), pool_size=2, max_overflow=1)
    rng = random.Random(7)

    async def worker() -> None:
        async with engine.connect() as conn:
            await asyncio.sleep(rng.uniform(0, 0.02))
            await conn.execute(text("SELECT 1"))

    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(worker()) for _ in range(200)]
    for task in tasks:
        loop.call_later(rng.uniform(0, 0.3), task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    label = pool_label(postgres)
    assert samples.value("db_client_connection_pending_requests", **label) == 0
    assert (
        samples.value("db_client_connection_count", db_client_connection_state="used", **label) == 0
    )
    await engine.dispose()


@pytest.mark.parametrize("port", ["abc", "70000"])
def test_bad_metrics_port_fails_at_start_with_one_clear_line(app_server, port):
    with pytest.raises(RuntimeError) as failure:
        app_server(APP, {"POOLWATCH_METRICS_PORT": port}, metrics=False)
    message = str(failure.value)
    assert f"POOLWATCH_METRICS_PORT={port!r} is invalid: expected an integer 0-65535" in message


def test_metrics_port_in_use_the_app_serves_and_says_why_once(app_server):
    first = app_server(APP)
    port = first.metrics_port
    second = app_server(APP, {"POOLWATCH_METRICS_PORT": str(port)}, metrics=False)
    for _ in range(5):
        assert get(second.url + "/ok") == '{"ok":true}'
    log = second.log()
    line = f"POOLWATCH_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}"
    assert log.count(line) == 1, log
    warning = next(text for text in log.splitlines() if line in text)
    assert "Choose a free port" in warning  # what is off and the fix, on one line
    assert "Traceback" not in log


def test_metrics_port_in_use_with_strict_stops_start_up(app_server):
    first = app_server(APP)
    port = first.metrics_port
    with pytest.raises(RuntimeError) as failure:
        app_server(
            APP, {"POOLWATCH_METRICS_PORT": str(port), "POOLWATCH_STRICT": "true"}, metrics=False
        )
    assert f"POOLWATCH_METRICS_PORT={port}: cannot listen on" in str(failure.value)
    assert "POOLWATCH_STRICT=true" in str(failure.value)
