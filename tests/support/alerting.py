"""A real Alertmanager (Debian package) on loopback, a webhook receiver standing in for the pager
and the chat, and a sustained HTTP load. Everything is bounded in time. Prometheus itself is in
``prometheus.py``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from .net import free_port
from .servers import Server, start_server


def start_alertmanager(config: dict[str, Any]) -> Server:
    root, port = tempfile.mkdtemp(prefix="poolwatch-am-"), free_port()
    with open(os.path.join(root, "alertmanager.yml"), "w") as f:
        yaml.safe_dump(config, f)
    return start_server(
        "prometheus-alertmanager",
        [
            f"--config.file={root}/alertmanager.yml",
            f"--storage.path={root}/data",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: a single instance
        ],
        port,
        root,
    )


@dataclass
class Received:
    path: str
    body: Any
    at: float


@dataclass
class Receiver:
    """A webhook receiver on loopback (aiohttp on its own thread): records every POST."""

    port: int = 0
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("webhook receiver did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in list(self.received) if r.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, await request.json(), time.monotonic()))
        if request.path == "/pager":  # PagerDuty Events API v2 answers 202
            return web.json_response({"status": "success"}, status=202)
        return web.Response(text="ok")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class Load:
    """``concurrency`` clients per URL, each GETting it back to back, on a thread, until
    ``stop()`` (or ``limit`` seconds, whichever comes first)."""

    def __init__(
        self, urls: list[str], concurrency: int, limit: float = 60.0, fresh_connections=False
    ) -> None:
        self.urls, self.concurrency, self.limit = urls, concurrency, limit
        self.fresh = fresh_connections  # a new TCP connection per request: spread over workers
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, session: aiohttp.ClientSession, url: str, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    await response.read()
                    self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            except (TimeoutError, aiohttp.ClientError):
                self.statuses[0] = self.statuses.get(0, 0) + 1
                await asyncio.sleep(0.05)

    async def _main(self) -> None:
        deadline = time.monotonic() + self.limit
        connector = aiohttp.TCPConnector(limit=0, force_close=self.fresh)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(
                *(
                    self._client(session, url, deadline)
                    for url in self.urls
                    for _ in range(self.concurrency)
                )
            )

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=40)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Short windows for live tests: the thresholds stay the table's, only `for:` and rate windows
# shrink, through the same override file users pass to `poolwatch generate --overrides`.
SHORT_WINDOWS = """\
[pool_utilization]
for = "2s"
[connection_wait_p99]
for = "2s"
window = "3s"
[overflow_usage]
for = "2s"
[failed_checkouts]
for = "2s"
window = "3s"
[loop_lag_p99]
for = "2s"
window = "3s"
[http_client_utilization]
for = "2s"
[fleet_connection_budget]
for = "2s"
"""


def generate(root: str, overrides: str | None = None) -> subprocess.CompletedProcess[str]:
    """``poolwatch generate [--overrides FILE] --root ROOT`` as a user runs it."""
    import sys

    args = [sys.executable, "-m", "poolwatch.cli", "generate", "--root", root]
    if overrides is not None:
        path = os.path.join(root, "overrides.toml")
        os.makedirs(root, exist_ok=True)
        with open(path, "w") as f:
            f.write(overrides)
        args += ["--overrides", path]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
