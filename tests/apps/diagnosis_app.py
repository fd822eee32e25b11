"""A FastAPI app that commits each of the guide's mistakes on its own route, beside routes that
do the same work right (``/ok/...``): the diagnosis probe must flag the first and never the others.

``SA_URL`` (async SQLAlchemy on PostgreSQL), ``ASYNCPG_DSN``, ``SYNC_SA_URL`` (a sync engine,
SQLite), ``UPSTREAM`` (an HTTP server the client routes call); ``LEAVE_OPEN=1`` leaves an aiohttp
session and the engine open at shutdown. SQL parameters carry a planted secret: it must never
reach a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
import asyncpg
import httpx
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from poolwatch import instrument

SECRET = os.environ.get("PLANTED_PARAMETER", "")  # a value the app passes as a SQL parameter
LEAVE_OPEN = os.environ.get("LEAVE_OPEN") == "1"
state: dict = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state["engine"] = create_async_engine(os.environ["SA_URL"], pool_size=4, max_overflow=4)
    state["sessions"] = async_sessionmaker(state["engine"], expire_on_commit=False)
    state["pool"] = await asyncpg.create_pool(os.environ["ASYNCPG_DSN"], min_size=1, max_size=4)
    state["sync"] = create_engine(os.environ["SYNC_SA_URL"])
    state["http"] = aiohttp.ClientSession()
    yield
    if not LEAVE_OPEN:
        await state["http"].close()
        await state["engine"].dispose()
    state["sync"].dispose()
    await state["pool"].close()


app = FastAPI(lifespan=lifespan)
instrument(app)


async def one_row(session: AsyncSession, n: int) -> int:
    query = text("SELECT CAST(:n AS int), CAST(:s AS text)")
    return (await session.execute(query, {"n": n, "s": SECRET})).one()[0]


# --- the mistakes ---------------------------------------------------------------------------
@app.get("/bad/engine")
async def engine_per_request():
    engine = create_async_engine(os.environ["SA_URL"])
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    await engine.dispose()
    return {"ok": True}


@app.get("/bad/asyncpg-pool")
async def asyncpg_pool_per_request():
    pool = await asyncpg.create_pool(os.environ["ASYNCPG_DSN"], min_size=1, max_size=1)
    await pool.fetchval("SELECT 1")
    await pool.close()
    return {"ok": True}


@app.get("/bad/aiohttp")
async def aiohttp_session_per_request():
    async with aiohttp.ClientSession() as session, session.get(os.environ["UPSTREAM"]) as r:
        await r.read()
    return {"ok": True}


@app.get("/bad/httpx")
async def httpx_client_per_request():
    async with httpx.AsyncClient() as client:
        await client.get(os.environ["UPSTREAM"])
    return {"ok": True}


@app.get("/bad/sync")
async def sync_query_on_the_loop():
    with state["sync"].connect() as conn:
        conn.execute(text("SELECT :s"), {"s": SECRET})
    return {"ok": True}


@app.get("/bad/n-plus-one")
async def n_plus_one():
    async with state["sessions"]() as session:
        return {"rows": [await one_row(session, n) for n in range(12)]}


@app.get("/bad/n-plus-one-literals")
async def n_plus_one_literals():
    async with state["pool"].acquire() as conn:
        rows = [await conn.fetchval(f"SELECT {n} + 1") for n in range(12)]
    return {"rows": rows}


@app.get("/bad/shared-session")
async def shared_session():
    async with state["sessions"]() as session:
        with contextlib.suppress(Exception):  # SQLAlchemy may refuse the second one: fine
            await asyncio.gather(one_row(session, 1), one_row(session, 2))
    return {"ok": True}


async def swallows_cancel() -> str:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "swallowed"  # the mistake: the cancellation is lost
    return "slept"


@app.get("/bad/swallow")
async def swallowed():
    task = asyncio.create_task(swallows_cancel())
    await asyncio.sleep(0.01)
    task.cancel()
    return {"result": await task}


# --- the same work done right ---------------------------------------------------------------
@app.get("/ok/query/{n}")
async def ok_query(n: int):
    async with state["sessions"]() as session:
        value = await one_row(session, n)
    async with state["http"].get(os.environ["UPSTREAM"]) as r:
        await r.read()
    return {"value": value, "pool": await state["pool"].fetchval("SELECT $1::int", n)}


@app.get("/ok/batch")
async def ok_batch():
    async with state["sessions"]() as session:
        rows = await session.execute(text("SELECT g FROM generate_series(1, 12) AS g"))
        return {"rows": [r[0] for r in rows]}


async def cancelled_right() -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.sleep(0)  # cleanup, then
        raise


@app.get("/ok/cancel")
async def ok_cancel():
    timed_out = False
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
    except TimeoutError:
        timed_out = True
    async with asyncio.TaskGroup() as group:
        group.create_task(asyncio.sleep(0))
        group.create_task(one_task_each())
    task = asyncio.create_task(cancelled_right())
    await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    task = asyncio.current_task()
    if task is not None:  # uncancel() used as designed: a cancel taken back
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)
        task.uncancel()
    return {"timed_out": timed_out}


async def one_task_each() -> None:
    async with state["sessions"]() as session:
        await asyncio.gather(*(own_session(n) for n in range(3)))
        await one_row(session, 0)


async def own_session(n: int) -> None:
    async with state["sessions"]() as session:
        await one_row(session, n)
