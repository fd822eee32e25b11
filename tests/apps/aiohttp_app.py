"""A FastAPI app calling upstream services through one aiohttp session made in its lifespan,
*after* ``instrument(app)``: the user's code has no poolwatch call besides ``instrument``.

Configured by environment: ``UPSTREAM_<NAME>`` (the URL ``/call/<name>`` fetches), optional
``METHOD_<NAME>`` (GET) and ``TIMEOUT_<NAME>`` (the request's total timeout, seconds), ``LIMIT`` and
``LIMIT_PER_HOST`` (the session's ``TCPConnector`` limits); ``TEST_APP_BARE=1`` serves the same
app without poolwatch, for comparisons.
"""

from __future__ import annotations

import contextlib
import os
import time

import aiohttp
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from poolwatch import instrument

state: dict = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    connector = aiohttp.TCPConnector(
        limit=int(os.environ.get("LIMIT", "100")),
        limit_per_host=int(os.environ.get("LIMIT_PER_HOST", "0")),
    )
    state["session"] = aiohttp.ClientSession(connector=connector)
    yield
    await state["session"].close()


app = FastAPI(lifespan=lifespan)


@app.get("/call/{name}")
async def call(name: str):
    url = os.environ[f"UPSTREAM_{name.upper()}"]
    method = os.environ.get(f"METHOD_{name.upper()}", "GET")
    timeout = os.environ.get(f"TIMEOUT_{name.upper()}")
    options = {"timeout": aiohttp.ClientTimeout(total=float(timeout))} if timeout else {}
    started = time.perf_counter()
    try:
        async with state["session"].request(method, url, **options) as response:
            body = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:  # what aiohttp raised, as is
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return JSONResponse({"error": kind, "message": str(exc)}, status_code=502)
    return {"status": response.status, "body": body, "elapsed": time.perf_counter() - started}


if os.environ.get("TEST_APP_BARE") != "1":
    instrument(app)
