"""Bounded concurrent HTTP load and a background scraper that samples /metrics meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp

from .net import Samples, scrape


async def burst(url: str, n: int, timeout: float = 30.0) -> list[int]:
    """``n`` concurrent GETs of ``url``; returns the status codes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one() for _ in range(n)))


class Sampler:
    """Scrapes ``metrics_url`` every ``interval`` seconds on a thread until stopped."""

    def __init__(self, metrics_url: str, interval: float = 0.03) -> None:
        self.url, self.interval = metrics_url, interval
        self.samples: list[Samples] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(scrape(self.url))
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def max(self, name: str, **labels: str) -> float:
        return max(s.value(name, **labels) for s in self.samples)
