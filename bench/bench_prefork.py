"""The cost of the zero-config multi-worker mode, per worker, beside single-process mode.

    python -m bench.bench_prefork [--seconds 6] [--rounds 5] [--workers 2]

Four uvicorn servers of the pool app (tests/apps/pool_app.py, SQLite), in interleaved rounds:
bare and with poolwatch, each as one process (``--workers 1``: single-process mode) and with
``--workers N`` (pre-fork mode: every worker but the serving one publishes its file each
second; the serving one merges the others' files at each scrape). Each server is measured idle,
then under a bounded loopback load (4 clients looping on ``GET /ok`` for ``--seconds``), and
poolwatch's target is scraped every second meanwhile. Reported: CPU seconds per second per
worker (idle) and CPU per request (under load), summed over the workers from the kernel's
per-process CPU clocks. poolwatch's own cost is the instrumented minus the bare server of the
same shape in the same round (median over rounds); pre-fork / single of that cost is the price
of the mode.
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
from tests.support.exporter import start_workers
from tests.support.net import free_port, get, scrape, wait_for

APP = "tests.apps.pool_app:app"


def worker_pids(server) -> list[int]:
    """The server's workers: the process itself with one worker, else its children (but
    multiprocessing's resource tracker)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    workers = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"resource_tracker" not in f.read():
                workers.append(child)
    return workers or [pid]


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


async def load(url: str, seconds: float, clients: int = 4) -> int:
    """``clients`` loops of GET ``url`` for ``seconds``; returns the requests served."""
    done = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while loop.time() < deadline:
            async with session.get(url) as response:
                await response.read()
            done += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done


def cpu(pids: list[int]) -> float:
    """CPU seconds of the processes, every thread (exited ones too), to the nanosecond: the
    kernel's process CPU clock of another process (/proc's utime+stime count 10 ms ticks)."""
    return sum(time.clock_gettime((~pid << 3) | 2) for pid in pids)  # CPUCLOCK_SCHED of pid


async def measure(workers: int, bare: bool, seconds: float, tmp: str) -> tuple[float, float]:
    """(idle CPU s/s per worker, CPU s per request) of one server."""
    env = {
        "SA_URL": f"sqlite+aiosqlite:///{tmp}/bench.db",
        "TEST_APP_BARE": "1" if bare else "0",
        "TMPDIR": tmp,
    }
    metrics_port = 0 if bare else free_port()
    server = start_workers("uvicorn", APP, workers, env, metrics_port=metrics_port)
    try:
        pids = wait_for(lambda: len(p := worker_pids(server)) == workers and p, timeout=30)
        for _ in range(workers * 4):  # every worker has served and started its agent
            get(server.url + "/sa/query")
        metrics = None if bare else server.metrics_url
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
    shapes = {
        "bare, 1 process": (1, True),
        "poolwatch, 1 process": (1, False),
        f"bare, {workers} workers": (workers, True),
        f"poolwatch, {workers} workers": (workers, False),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
    with tempfile.TemporaryDirectory(prefix="bench-prefork-") as tmp:
        for _ in range(rounds):
            for name, (count, bare) in shapes.items():
                runs[name].append(await measure(count, bare, seconds, tmp))
        assert os.listdir(tmp) == ["bench.db"], os.listdir(tmp)  # nothing left behind
    names = list(shapes)
    print(
        f"\n{rounds} interleaved rounds, {seconds:.0f} s idle + {seconds:.0f} s load each; medians"
    )
    print(f"{'server':<26}{'idle CPU ms/s per worker':>26}{'CPU µs per request':>20}")
    for name in names:
        idle = statistics.median(run[0] for run in runs[name])
        request = statistics.median(run[1] for run in runs[name])
        print(f"{name:<26}{idle * 1e3:>26.2f}{request * 1e6:>20.1f}")

    def own_cost(bare: str, instrumented: str, field: int) -> float:
        """Median over the rounds of instrumented minus bare, measured back to back."""
        pairs = zip(runs[bare], runs[instrumented], strict=True)
        return statistics.median(pw[field] - b[field] for b, pw in pairs)

    single = [own_cost(names[0], names[1], field) for field in (0, 1)]
    multi = [own_cost(names[2], names[3], field) for field in (0, 1)]
    print("\npoolwatch's own cost (instrumented minus bare of the same shape, same round):")
    print(f"{'':<26}{'idle ms/s per worker':>26}{'µs per request':>20}")
    print(f"{'single-process mode':<26}{single[0] * 1e3:>26.2f}{single[1] * 1e6:>20.1f}")
    print(f"{'pre-fork mode':<26}{multi[0] * 1e3:>26.2f}{multi[1] * 1e6:>20.1f}")
    print(
        f"{'ratio pre-fork / single':<26}{multi[0] / single[0]:>26.2f}{multi[1] / single[1]:>20.2f}"
    )
    bare_requests = [run[1] for run in runs[names[2]]]
    spread = max(bare_requests) / min(bare_requests) - 1
    print(f"(run-to-run spread of the bare {workers}-worker server per request: {spread:.0%})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.workers))
