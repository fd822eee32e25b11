"""The cost of the zero-config multi-worker mode, per worker, beside single-process mode.

    python -m bench.bench_prefork [--seconds 5] [--rounds 5] [--workers 2]

uvicorn servers of the pool app (tests/apps/pool_app.py, SQLite), in interleaved rounds: bare
and with poolwatch, each as one process (``--workers 1``: single-process mode) and with
``--workers N`` (pre-fork mode: every worker but the serving one publishes its file each
second; the serving one merges the others' files at each scrape); and, as the control of the
mode itself, N workers with poolwatch but no target (POOLWATCH_METRICS_PORT=0).

Each server is measured idle, then under a bounded loopback load (``GET /ok`` at 500 per
second for ``--seconds``); poolwatch's target is scraped every second meanwhile. Reported: CPU
seconds per second per worker (idle) and CPU per request (under load), summed over the workers
from the kernel's per-process CPU clocks. Each server is compared with another measured in the
same round (idle: the CPU added; per request: the ratio); medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import threading
import time

import aiohttp
from tests.support.exporter import start_workers, worker_pids
from tests.support.net import free_port, get, scrape, wait_for

APP = "tests.apps.pool_app:app"
RATE = 500.0  # requests per second of the load


class Scraper:
    """GET /metrics every second on a thread (what Prometheus does, at a short interval)."""

    def __init__(self, url: str | None) -> None:
        self.url, self._stop = url, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError):
                get(self.url)

    def __enter__(self) -> Scraper:
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.url:
            self._thread.join(timeout=10)


async def load(url: str, seconds: float, rate: float = RATE) -> int:
    """``GET url`` at a steady ``rate`` per second for ``seconds`` (open loop, at most 16 in
    flight): a bounded load, the same for every server, far below saturation, so that the CPU
    per request does not depend on how well a busy server batches. Returns the requests."""
    count = int(seconds * rate)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one() -> None:
            async with gate, session.get(url) as response:
                await response.read()

        tasks = []
        start = loop.time()
        for i in range(count):
            if (delay := start + i / rate - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return count


def cpu(pids: list[int]) -> float:
    """CPU seconds of the processes, every thread (exited ones too), to the nanosecond: the
    kernel's process CPU clock of another process (/proc's utime+stime count 10 ms ticks)."""
    return sum(time.clock_gettime((~pid << 3) | 2) for pid in pids)  # CPUCLOCK_SCHED of pid


async def measure(workers: int, variant: str, seconds: float, tmp: str) -> tuple[float, float]:
    """(idle CPU s/s per worker, CPU s per request) of one server; ``variant``: bare, poolwatch
    or ``no target`` (poolwatch with POOLWATCH_METRICS_PORT=0: no listener, nothing shared)."""
    bare = variant == "bare"
    env = {
        "SA_URL": f"sqlite+aiosqlite:///{tmp}/bench.db",
        "TEST_APP_BARE": "1" if bare else "0",
        "TMPDIR": tmp,
    }
    metrics_port = free_port() if variant == "poolwatch" else 0
    server = start_workers("uvicorn", APP, workers, env, metrics_port=metrics_port)
    try:
        if workers == 1:  # uvicorn --workers 1 serves from the process itself
            pids = [server.proc.pid]
        else:
            pids = wait_for(lambda: len(p := worker_pids(server)) == workers and p, timeout=30)
            pids = [int(pid) for pid in pids]
        for _ in range(workers * 4):  # every worker has served and started its agent
            get(server.url + "/sa/query")
        metrics = server.metrics_url if metrics_port else None
        if metrics and workers > 1:

            def every_worker() -> bool:
                samples = scrape(metrics)
                return (
                    len({s.labels["worker"] for s in samples.find("poolwatch_build_info")})
                    == workers
                )

            wait_for(every_worker, timeout=20)
        await asyncio.sleep(1.0)
        with Scraper(metrics):
            started, before = time.monotonic(), cpu(pids)
            await asyncio.sleep(seconds)
            idle = (cpu(pids) - before) / (time.monotonic() - started) / workers
            before = cpu(pids)
            requests = await load(server.url + "/ok", seconds)
            per_request = (cpu(pids) - before) / requests
    finally:
        server.stop()
    return idle, per_request


async def main(seconds: float, rounds: int, workers: int) -> None:
    many = f"{workers} workers"
    shapes = {  # name -> (workers, variant)
        "bare, 1 process": (1, "bare"),
        "poolwatch, 1 process": (1, "poolwatch"),
        f"bare, {many}": (workers, "bare"),
        f"poolwatch, {many}, no target": (workers, "no target"),
        f"poolwatch, {many}": (workers, "poolwatch"),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
    with tempfile.TemporaryDirectory(prefix="bench-prefork-") as tmp:
        for _ in range(rounds):
            for name, (count, variant) in shapes.items():
                runs[name].append(await measure(count, variant, seconds, tmp))
        assert os.listdir(tmp) == ["bench.db"], os.listdir(tmp)  # nothing left behind
    med = statistics.median
    print(
        f"\n{rounds} interleaved rounds, {seconds:.0f} s idle + {seconds:.0f} s load each; medians"
    )
    print(f"{'server':<34}{'idle CPU ms/s per worker':>26}{'CPU µs per request':>20}")
    for name, values in runs.items():
        idle, request = med(v[0] for v in values), med(v[1] for v in values)
        print(f"{name:<34}{idle * 1e3:>26.2f}{request * 1e6:>20.1f}")

    def against(base: str, other: str) -> tuple[list[float], list[float]]:
        """Per round, measured back to back: idle CPU added per worker, per-request ratio."""
        pairs = list(zip(runs[base], runs[other], strict=True))
        return [o[0] - b[0] for b, o in pairs], [o[1] / b[1] for b, o in pairs]

    single = against("bare, 1 process", "poolwatch, 1 process")
    multi = against(f"bare, {many}", f"poolwatch, {many}")
    mode = against(f"poolwatch, {many}, no target", f"poolwatch, {many}")
    print("\nmedians of the per-round comparisons")
    print(f"{'':<34}{'idle ms/s per worker added':>26}{'per request, ratio':>20}")
    for label, (idle, request) in (
        ("poolwatch / bare, 1 process", single),
        (f"poolwatch / bare, {many}", multi),
        ("pre-fork target / no target", mode),
    ):
        print(f"{label:<34}{med(idle) * 1e3:>26.2f}{med(request):>20.3f}")
    idle_price = med(m / s for m, s in zip(multi[0], single[0], strict=True))
    request_price = med(m / s for m, s in zip(multi[1], single[1], strict=True))
    print(f"{'pre-fork / single-process mode':<34}{idle_price:>26.2f}{request_price:>20.3f}")
    spreads = ", ".join(
        f"{name} {max(v[1] for v in values) / min(v[1] for v in values) - 1:.0%}"
        for name, values in runs.items()
    )
    print(f"(per-request CPU, max/min - 1 over the rounds: {spreads})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.workers))
