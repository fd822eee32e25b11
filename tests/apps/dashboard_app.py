"""Everything the dashboards show, in one app: a SQLAlchemy pool and an asyncpg pool on real
PostgreSQL, an aiohttp session and an httpx client to an upstream, routed HTTP endpoints and a
route that blocks the event loop. Pools and clients are made in the lifespan, after
``instrument(app)``.

Environment: ``SA_URL`` (async SQLAlchemy URL), ``ASYNCPG_DSN``, ``UPSTREAM_URL``. The pools are
small (SQLAlchemy 2 + 1 overflow, asyncpg 3; 0.2 s checkout timeout) and the connector allows 2
connections per host (the httpx client 2 in all), so a modest load fills them, queues and
times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import aiohttp
import asyncpg
import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import create_async_engine

from poolwatch import instrument

TIMEOUT = 0.2
state: dict = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state["engine"] = create_async_engine(
        os.environ["SA_URL"], pool_size=2, max_overflow=1, pool_timeout=TIMEOUT
    )
    state["pool"] = await asyncpg.create_pool(os.environ["ASYNCPG_DSN"], min_size=1, max_size=3)
    state["session"] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, limit_per_host=2),
        timeout=aiohttp.ClientTimeout(total=10),
    )
    state["httpx"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=2), timeout=10)
    yield
    await state["httpx"].aclose()
    await state["session"].close()
    await state["pool"].close()
    await state["engine"].dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/db/sqlalchemy")
async def sqlalchemy_hold(hold: float = 0.1):
    try:
        async with state["engine"].connect() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(hold)
    except exc.TimeoutError:
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"ok": True}


@app.get("/db/invalidate")
async def sqlalchemy_invalidate():
    async with state["engine"].connect() as conn:
        await conn.execute(text("SELECT 1"))
        await conn.invalidate()  # e.g. after a network error: the pool drops the connection
    return {"invalidated": True}


@app.get("/db/asyncpg")
async def asyncpg_hold(hold: float = 0.1):
    try:
        async with state["pool"].acquire(timeout=TIMEOUT) as conn:
            await conn.fetchval("SELECT 1")
            await asyncio.sleep(hold)
    except TimeoutError:
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"ok": True}


@app.get("/upstream")
async def upstream(delay: float = 0.2, close: bool = False):
    url = f"{os.environ['UPSTREAM_URL']}/{'close' if close else 'slow'}"
    async with state["session"].get(url, params={"delay": str(delay)}) as response:
        return {"status": response.status, "body": await response.json()}


@app.get("/upstream/httpx")
async def upstream_httpx(delay: float = 0.2):
    response = await state["httpx"].get(f"{os.environ['UPSTREAM_URL']}/slow?delay={delay}")
    return {"status": response.status_code}


def slow_helper(seconds: float) -> None:
    time.sleep(seconds)  # the bug the event-loop dashboard shows: a sync call on the loop


@app.get("/block")
async def block(seconds: float = 0.15):
    slow_helper(seconds)
    return {"blocked": seconds}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"item": item_id}


instrument(app)
