"""``poolwatch demo``: an instrumented FastAPI app on SQLite with an aiohttp upstream, and a load
that walks healthy -> pool exhaustion -> blocked loop while a live view shows the pool.

Everything runs in this process: the app under uvicorn on the main thread's loop; the load, the
live view and the closing summary (``demo_view``) on threads of their own, so a blocked app
loop stops neither; the view reads the app's own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

PHASES = (
    # name, concurrent clients, route
    ("healthy", 2, "/orders"),
    ("pool exhaustion", 32, "/orders"),
    ("blocked loop", 2, "/report"),
)
POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT = 4, 2, 0.25


def build_app(database_url: str, upstream_url: str, instrumented: bool = True) -> Any:
    import aiohttp
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from sqlalchemy import exc, text
    from sqlalchemy.ext.asyncio import create_async_engine

    from .. import instrument

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["engine"] = create_async_engine(
            database_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=POOL_TIMEOUT
        )
        state["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        yield
        await state["http"].close()
        await state["engine"].dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/orders")
    async def orders():
        try:
            async with state["engine"].connect() as conn:
                await conn.execute(text("SELECT 1"))
                await asyncio.sleep(random.uniform(0.02, 0.08))  # the "query" holds the connection
        except exc.TimeoutError:
            return JSONResponse({"error": "pool exhausted"}, status_code=503)
        async with state["http"].get(upstream_url) as response:
            await response.read()
        return {"ok": True}

    @app.get("/report")
    async def report():
        # The report's second bug, which poolwatch's diagnosis names (n_plus_one): one query
        # per order instead of one for all of them.
        with contextlib.suppress(exc.TimeoutError):
            async with state["engine"].connect() as conn:
                for order in range(12):
                    await conn.execute(text("SELECT :order"), {"order": order})
        time.sleep(0.25)  # a sync call on the event loop: the bug the demo shows
        return {"ok": True}

    return instrument(app) if instrumented else app


async def _upstream(port: int) -> Any:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_arguments(parser: Any) -> None:
    from ._common import port, positive_seconds

    parser.add_argument("--duration", type=positive_seconds, help="stop after this many seconds")
    parser.add_argument("--database-url", help="SQLAlchemy async URL (default: SQLite, temp dir)")
    parser.add_argument("--port", type=port, default=8000, help="app port (8000; 0: any free)")
    parser.add_argument(
        "--metrics-port", type=port, default=9464, help="/metrics port (9464; 0: any free)"
    )


def run(args: Any) -> int:
    return serve(args.duration, args.database_url, args.port, args.metrics_port)


def serve(duration: float | None, database_url: str | None, port: int, metrics_port: int) -> int:
    import uvicorn
    from rich.console import Console
    from rich.live import Live

    from .demo_view import Blocks, Load, View

    # 0 picks a free port here, not in the servers: the load and the view need to know it
    port, metrics_port = port or _free_port(), metrics_port or _free_port()
    workdir = tempfile.mkdtemp(prefix="poolwatch-demo-")
    database_url = database_url or f"sqlite+aiosqlite:///{os.path.join(workdir, 'demo.db')}"
    os.environ.setdefault("POOLWATCH_METRICS_PORT", str(metrics_port))
    blocks = Blocks()
    blocks.install()  # the agent's block warnings become the view's "recent blocks" line
    upstream_port = _free_port()
    app = build_app(database_url, f"http://127.0.0.1:{upstream_port}/")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    stop = threading.Event()
    phase_seconds = (duration / len(PHASES)) if duration else 10.0
    metrics_url = f"http://127.0.0.1:{os.environ['POOLWATCH_METRICS_PORT']}/metrics"
    load = Load(port, PHASES)
    view = View(f"http://127.0.0.1:{port}", metrics_url, load, blocks)
    console = Console()

    def show() -> None:  # a thread: keeps drawing while the app's loop is blocked
        while not server.started and not stop.is_set():
            time.sleep(0.05)
        load.start()
        started, shown_phase, frame = time.monotonic(), 0, None
        # On a terminal one screen redrawn in place; piped, the last frame of each phase.
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        with live or contextlib.nullcontext():
            while not stop.is_set():
                elapsed = time.monotonic() - started
                if duration and elapsed >= duration:
                    break
                load.phase = int(elapsed // phase_seconds) % len(PHASES)
                if live is None and frame is not None and load.phase != shown_phase:
                    console.print(frame)
                shown_phase = load.phase
                snap = view.fetch()
                if snap is not None:
                    view.observe(snap, load.phase, load.responses())
                frame = view.frame(snap, load.phase, elapsed, duration)
                if live is not None:
                    live.update(frame, refresh=True)
                stop.wait(1.0)
        if live is None and frame is not None:
            console.print(frame)
        stop.set()
        server.should_exit = True

    viewer = threading.Thread(target=show, name="poolwatch-demo-view", daemon=True)

    async def main() -> None:
        runner = await _upstream(upstream_port)
        viewer.start()
        try:
            await server.serve()
        finally:
            stop.set()
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        stop.set()
    viewer.join(timeout=5)
    load.close()
    shutil.rmtree(workdir, ignore_errors=True)  # the embedded SQLite database
    summary = view.summary(os.environ["POOLWATCH_METRICS_PORT"], min(console.width, 100))
    console.print(summary, highlight=False, soft_wrap=True)
    sys.stdout.flush()
    return 0
