"""``pool_app`` plus templated routes, for the HTTP server metric and OTLP tests.

Same environment as ``pool_app`` (``SA_URL``, ``ASYNCPG_DSN``, ...), plus ``UPSTREAM_URL``: an
aiohttp session made in the lifespan calls it on ``/upstream``. poolwatch settings come from
``POOLWATCH_*``/``OTEL_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tests.apps.pool_app import app, state

pool_app_lifespan = app.router.lifespan_context


@contextlib.asynccontextmanager
async def lifespan(app):
    async with pool_app_lifespan(app):
        if os.environ.get("UPSTREAM_URL"):
            state["session"] = aiohttp.ClientSession()
        yield
        if "session" in state:
            await state["session"].close()


app.router.lifespan_context = lifespan


@app.get("/upstream")
async def upstream():
    async with state["session"].get(os.environ["UPSTREAM_URL"] + "/slow?delay=0.01") as response:
        return {"upstream": response.status}


@app.get("/users/{user_id}")
async def user(user_id: int):
    return {"user": user_id}


@app.get("/sleep/{seconds}")
async def sleep(seconds: float):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/fail")
async def fail():
    raise RuntimeError("the app's own bug")


@app.post("/orders/{order_id}/items/{item_id}")
async def add_item(order_id: int, item_id: int):
    from sqlalchemy import text

    async with state["engine"].connect() as conn:
        value = (await conn.execute(text("SELECT CAST(:n AS integer)"), {"n": item_id})).scalar()
    return JSONResponse({"order": order_id, "item": value}, status_code=201)


router = APIRouter(prefix="/api/v2")


@router.get("/things/{thing_id}")
async def thing(thing_id: str):
    return {"thing": thing_id}


app.include_router(router)
