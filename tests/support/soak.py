"""Bounded load on the demo app (uvicorn subprocess) with RSS, CPU and series-count sampling."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .net import scrape

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def start_upstream() -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(0.005)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/"


@dataclass
class SoakResult:
    requests: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (elapsed s, bytes)
    series: list[tuple[float, int]] = field(default_factory=list)
    cpu: float = 0.0  # process CPU seconds spent during the run


async def soak(server, seconds: float, clients: int = 4, sample_every: float = 5.0) -> SoakResult:
    """Clients hit /orders in a loop (and /report, a 0.25 s loop block, every 5 s) for
    ``seconds``; RSS and the series count are sampled every ``sample_every`` seconds."""
    result = SoakResult()
    loop = asyncio.get_running_loop()
    start = loop.time()
    cpu_start = cpu_seconds(server.proc.pid)

    async def client(session: aiohttp.ClientSession) -> None:
        while loop.time() - start < seconds:
            async with session.get(server.url + "/orders") as response:
                await response.read()
            result.requests += 1

    async def blocker(session: aiohttp.ClientSession) -> None:
        while loop.time() - start < seconds:
            await asyncio.sleep(5)
            async with session.get(server.url + "/report") as response:
                await response.read()

    async def sampler() -> None:
        while (elapsed := loop.time() - start) < seconds:
            result.rss.append((elapsed, rss_bytes(server.proc.pid)))
            if server.metrics_port:  # a bare app has no /metrics
                samples = await asyncio.to_thread(scrape, server.metrics_url)
                result.series.append((elapsed, len(samples.samples)))
            await asyncio.sleep(sample_every)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(
            sampler(), blocker(session), *(client(session) for _ in range(clients))
        )
    result.cpu = cpu_seconds(server.proc.pid) - cpu_start
    return result


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
