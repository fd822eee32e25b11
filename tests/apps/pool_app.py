"""A FastAPI app like our users': engines made in the lifespan, *after* ``instrument(app)``.

Configured by environment: ``SA_URL`` (async SQLAlchemy), ``SYNC_SA_URL`` (sync engine used from
the thread pool), ``ASYNCPG_DSN`` (a raw asyncpg pool), pool sizes ``POOL_SIZE``, ``MAX_OVERFLOW``,
``POOL_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from poolwatch import instrument

SIZE = int(os.environ.get("POOL_SIZE", "2"))
OVERFLOW = int(os.environ.get("MAX_OVERFLOW", "1"))
TIMEOUT = float(os.environ.get("POOL_TIMEOUT", "0.2"))
state: dict = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    if url := os.environ.get("SA_URL"):
        from sqlalchemy.ext.asyncio import create_async_engine

        state["engine"] = create_async_engine(
            url, pool_size=SIZE, max_overflow=OVERFLOW, pool_timeout=TIMEOUT
        )
    if url := os.environ.get("SYNC_SA_URL"):
        from sqlalchemy import create_engine

        state["sync_engine"] = create_engine(
            url, pool_size=SIZE, max_overflow=OVERFLOW, pool_timeout=TIMEOUT
        )
    if dsn := os.environ.get("ASYNCPG_DSN"):
        import asyncpg

        state["pool"] = await asyncpg.create_pool(dsn, min_size=1, max_size=SIZE + OVERFLOW)
    yield
    if "engine" in state:
        await state["engine"].dispose()
    if "sync_engine" in state:
        state["sync_engine"].dispose()
    if "pool" in state:
        await state["pool"].close()


app = FastAPI(lifespan=lifespan)


@app.get("/sa/hold")
async def sa_hold(seconds: float = 0.3):
    from sqlalchemy import exc, text

    try:
        async with state["engine"].connect() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(seconds)
    except exc.TimeoutError:
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"ok": True}


@app.get("/sync/hold")
def sync_hold(seconds: float = 0.3):
    from sqlalchemy import exc, text

    try:
        with state["sync_engine"].connect() as conn:
            conn.execute(text("SELECT 1"))
            time.sleep(seconds)
    except exc.TimeoutError:
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"ok": True}


@app.get("/apg/hold")
async def apg_hold(seconds: float = 0.3):
    try:
        async with state["pool"].acquire(timeout=TIMEOUT) as conn:
            await conn.fetchval("SELECT 1")
            await asyncio.sleep(seconds)
    except TimeoutError:
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"ok": True}


def _error(exc: Exception) -> JSONResponse:
    """The app's own error, as the client sees it: library module and exception type."""
    return JSONResponse({"error": f"{type(exc).__module__}.{type(exc).__name__}"}, status_code=500)


@app.get("/sa/query")
async def sa_query():
    from sqlalchemy import text

    try:
        async with state["engine"].connect() as conn:
            return {"value": (await conn.execute(text("SELECT 1"))).scalar()}
    except Exception as exc:
        return _error(exc)


@app.get("/apg/query")
async def apg_query():
    try:
        async with state["pool"].acquire(timeout=2) as conn:
            return {"value": await conn.fetchval("SELECT 1")}
    except Exception as exc:
        return _error(exc)


@app.get("/block")
async def block(seconds: float = 1.0):
    time.sleep(seconds)  # the bug we want to see: a sync call on the event loop
    return {"blocked": seconds}


@app.get("/ok")
async def ok():
    return {"ok": True}


if os.environ.get("TEST_APP_BARE") != "1":  # the same app without poolwatch, for comparisons
    instrument(app)
