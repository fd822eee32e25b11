"""A FastAPI app with the bug the loop probe exists for: a sync call on the event loop."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI

from poolwatch import instrument

app = FastAPI()
_background: set[asyncio.Task] = set()


def slow_helper(seconds: float) -> None:
    time.sleep(seconds)  # blocks every request of this worker


@app.get("/slow")
async def slow(seconds: float = 0.3):
    slow_helper(seconds)
    return {"slept": seconds}


@app.get("/ok")
async def ok():
    return {"ok": True}


@app.get("/spawn")
async def spawn(n: int = 10, seconds: float = 2.0):
    for _ in range(n):
        task = asyncio.create_task(asyncio.sleep(seconds))
        _background.add(task)
        task.add_done_callback(_background.discard)
    return {"spawned": n}


instrument(app)
