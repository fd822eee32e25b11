"""A FastAPI app with the other pools of a typical service: a redis client made at import,
*before* ``instrument(app)``; a redis ``BlockingConnectionPool``, a psycopg pool and an httpx
client made in the lifespan, *after* it.

Configured by environment: ``REDIS_URL`` (with its password), ``PG_DSN``, ``UPSTREAM_URL`` (a
loopback HTTP server with ``/slow?delay=S``). Every pool allows 3 connections and waits at most
``POOL_TIMEOUT`` seconds for one (the default redis pool does not wait: it refuses at once).
"""

from __future__ import annotations

import contextlib
import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from poolwatch import instrument

MAX = 3
TIMEOUT = float(os.environ.get("POOL_TIMEOUT", "0.5"))
state: dict = {}

if url := os.environ.get("REDIS_URL"):  # made before instrument(): found by the heap walk
    import redis.asyncio

    state["early_redis"] = redis.asyncio.Redis.from_url(f"{url}1", max_connections=MAX)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    if url := os.environ.get("REDIS_URL"):
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(
            f"{url}2", max_connections=MAX, timeout=TIMEOUT
        )
        state["redis"] = redis.asyncio.Redis(connection_pool=pool)
    if dsn := os.environ.get("PG_DSN"):
        from psycopg_pool import AsyncConnectionPool

        state["pg"] = AsyncConnectionPool(
            dsn, min_size=1, max_size=MAX, timeout=TIMEOUT, open=False
        )
        await state["pg"].open(wait=True)
    if os.environ.get("UPSTREAM_URL"):
        import httpx

        state["httpx"] = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=MAX),
            timeout=httpx.Timeout(10.0, pool=TIMEOUT),
        )
    yield
    for name in ("redis", "early_redis"):
        if name in state:
            await state[name].aclose()
    if "pg" in state:
        await state["pg"].close()
    if "httpx" in state:
        await state["httpx"].aclose()


app = FastAPI(lifespan=lifespan)


def _unavailable(exc: Exception) -> JSONResponse:
    return JSONResponse({"error": type(exc).__name__}, status_code=503)


@app.get("/redis/hold")
async def redis_hold(seconds: float = 0.2, early: bool = False):
    """BLPOP on an empty list holds a connection for ``seconds``."""
    import redis.exceptions

    client = state["early_redis" if early else "redis"]
    try:
        await client.blpop(["poolwatch-test-empty"], timeout=seconds)
    except redis.exceptions.ConnectionError as exc:  # no connection for this request
        return _unavailable(exc)
    return {"ok": True}


@app.get("/pg/hold")
async def pg_hold(seconds: float = 0.2):
    from psycopg_pool import PoolTimeout

    try:
        async with state["pg"].connection() as conn:
            await conn.execute("SELECT pg_sleep(%s)", (seconds,))
    except PoolTimeout as exc:
        return _unavailable(exc)
    return {"ok": True}


@app.get("/httpx/get")
async def httpx_get(delay: float = 0.2):
    import httpx

    try:
        response = await state["httpx"].get(f"{os.environ['UPSTREAM_URL']}/slow?delay={delay}")
    except httpx.PoolTimeout as exc:
        return _unavailable(exc)
    return {"status": response.status_code}


if os.environ.get("TEST_APP_BARE") != "1":
    instrument(app)
