"""The cost benchmark's app: a trivial FastAPI route; ``LOOP_PROBE=1`` watches the loop."""

from __future__ import annotations

import contextlib
import os

from fastapi import FastAPI

import poolwatch
from poolwatch.probes.loop import watching


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    stop = poolwatch.watch_event_loop() if os.environ.get("LOOP_PROBE") == "1" else None
    yield
    if stop is not None:
        stop()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def root():
    return {"ok": True}


@app.get("/ticks")
async def ticks():
    """Lag ticks so far (0 with the probe off): the instruction count's per-tick figure."""
    watcher = watching()
    return {"ticks": watcher.lag.value().count if watcher else 0}
