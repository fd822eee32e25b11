"""Pools made and closed again and again (an app built per test, a worker restarted): names stay
the same whenever scrapes happen, and poolwatch keeps no closed pool alive."""

from __future__ import annotations

import gc

import pytest

import poolwatch
from poolwatch.agent import agent as the_agent
from poolwatch.testing import snapshot

POOL = "db_client_connection_pool_name"


@pytest.fixture
def quiet_agent(clean_agent):
    """Instrumented in this process with no listener: nothing ever scrapes."""
    poolwatch.instrument(metrics_port=0)
    return clean_agent


def pool_names(probe: str) -> list[str]:
    """The names of ``probe``'s pools in a scrape now (a scrape also drops what it finds gone):
    SQLAlchemy's are those with invalidation counters."""
    now = snapshot()
    sqlalchemy = now.label_values("sqlalchemy_pool_invalidations_total", POOL)
    pools = now.label_values("db_client_connection_max", POOL)
    return sorted(sqlalchemy if probe == "sqlalchemy" else pools - sqlalchemy)


def instances(type_name: str, module: str) -> int:
    """Live objects of a class (asyncpg's Pool takes no weak reference: count the heap)."""
    gc.collect()
    return sum(
        type(o).__name__ == type_name and type(o).__module__ == module for o in gc.get_objects()
    )


@pytest.mark.parametrize("scrape_after_close", [(), (0,), (1,)])
async def test_asyncpg_pool_recreated_keeps_its_name_whenever_scrapes_happen(
    postgres, quiet_agent, scrape_after_close
):
    import asyncpg

    base = f"127.0.0.1:{postgres.port}/app"
    names = []
    for i in range(3):  # an app's lifespan: make the pool, use it, close it
        pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
        names.append(pool_names("asyncpg"))
        await pool.close()
        if i in scrape_after_close:
            pool_names("asyncpg")
    assert names == [[base]] * 3
    # two open at once are told apart; the first closing frees its name for the next
    first = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    second = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    assert pool_names("asyncpg") == [base, f"{base}#2"]
    first.terminate()
    third = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    assert pool_names("asyncpg") == [base, f"{base}#2"]
    await second.close()
    await third.close()
    assert pool_names("asyncpg") == []


async def test_sqlalchemy_engine_names_are_freed_on_dispose_and_collection(postgres, quiet_agent):
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    base = f"127.0.0.1:{postgres.port}/app"
    for _ in range(3):  # an app's lifespan: make the engine, use it, dispose of it
        engine = create_async_engine(postgres.dsn("postgresql+asyncpg"))
        async with engine.connect():
            pass
        assert pool_names("sqlalchemy") == [base]
        await engine.dispose()
        assert pool_names("sqlalchemy") == []
    # a disposed engine used again: its next new connection claims its name again
    async with engine.connect():
        assert pool_names("sqlalchemy") == [base]
    await engine.dispose()
    # an engine collected without dispose() frees its name too, before any scrape
    del engine
    dropped = create_engine(postgres.dsn("postgresql+psycopg"))
    assert [s.name for s in the_agent.registry.sources() if s.probe == "sqlalchemy"] == [base]
    del dropped
    gc.collect()
    kept = create_engine(postgres.dsn("postgresql+psycopg"))
    assert [s.name for s in the_agent.registry.sources() if s.probe == "sqlalchemy"] == [base]
    kept.dispose()


async def test_closed_pools_are_released_without_any_scrape(clean_agent, postgres):
    """Ten app start-ups (pool made, used, closed): as many pools alive as without poolwatch."""
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    async def ten_start_ups() -> tuple[int, int]:
        for _ in range(10):
            pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            await pool.close()
            engine = create_async_engine(postgres.dsn("postgresql+asyncpg"))
            async with engine.connect():
                pass
            await engine.dispose()
        del pool, conn, engine
        return instances("Pool", "asyncpg.pool"), instances("Engine", "sqlalchemy.engine.base")

    without = await ten_start_ups()
    poolwatch.instrument(metrics_port=0)
    with_poolwatch = await ten_start_ups()
    assert with_poolwatch == without == (0, 0)


async def test_closed_aiohttp_sessions_are_not_kept(quiet_agent):
    """aiohttp sessions are grouped by a name the app gives, never numbered: nothing to free,
    and a closed session's connector is only weakly referenced."""
    import aiohttp

    for _ in range(10):
        async with aiohttp.ClientSession():
            pass
    assert instances("ClientSession", "aiohttp.client") == 0
    assert instances("TCPConnector", "aiohttp.connector") == 0


async def test_an_engine_disposed_before_instrument_takes_no_name(clean_agent, postgres):
    """uninstrument() then instrument() again (between tests): the heap search finds the last
    test's engine, disposed of but not yet collected. It takes no name until it connects."""
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    base = f"127.0.0.1:{postgres.port}/app"
    engine = create_async_engine(postgres.dsn("postgresql+asyncpg"))
    async with engine.connect():
        pass
    await engine.dispose()
    poolwatch.instrument(metrics_port=0)
    pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    assert pool_names("asyncpg") == [base]
    async with engine.connect():  # used again after all: now it is measured
        assert pool_names("sqlalchemy") == [f"{base}#2"]
    await pool.close()
    await engine.dispose()
