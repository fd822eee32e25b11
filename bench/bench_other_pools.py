"""Added cost of the redis, psycopg_pool and httpx probes, side by side in one run.

    python -m bench.bench_other_pools [--cycles 2000] [--requests 200] [--rounds 21]

Interleaved rounds (medians) of bare (``uninstrument()``) and poolwatch (``instrument()``
finds the pools and clients made before it) for:
- redis.asyncio: ``get_connection()`` + ``release()`` on a ``ConnectionPool`` and on a
  ``BlockingConnectionPool`` (a real redis-server with a password; no command: the pool alone);
- psycopg_pool: ``getconn()`` + ``putconn()`` on an ``AsyncConnectionPool`` (real PostgreSQL);
- httpx: one ``AsyncClient.get()`` at a time over a kept-alive loopback connection to an
  upstream in its own process.
Targets: <= 2 µs added per checkout (redis, psycopg); <= 3 % added per httpx request (its
client thread's CPU time is printed beside the wall time: other processes on a shared machine
disturb it much less).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from tests.support import postgres as pg_support
from tests.support import redis as redis_support
from tests.support.net import free_port, wait_for_port

import poolwatch
from bench.bench_aiohttp import UPSTREAM
from bench.common import interleave, report


def bare() -> None:
    poolwatch.uninstrument()


def with_poolwatch() -> None:
    poolwatch.instrument(metrics_port=0)


VARIANTS = {"bare": bare, "poolwatch": with_poolwatch}


async def main(cycles: int, requests: int, rounds: int) -> None:
    import httpx
    import redis.asyncio
    from psycopg_pool import AsyncConnectionPool

    server = redis_support.start_redis()
    pg = pg_support.start_postgres()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port)])
    verdicts: list[str] = []
    try:
        wait_for_port(port, proc=upstream)
        plain = redis.asyncio.ConnectionPool.from_url(server.url(0), max_connections=5)
        blocking = redis.asyncio.BlockingConnectionPool.from_url(server.url(0), max_connections=5)
        psycopg = AsyncConnectionPool(pg.dsn(), min_size=5, max_size=5, open=False)
        await psycopg.open(wait=True)
        client = httpx.AsyncClient()
        url = f"http://127.0.0.1:{port}/"

        cpu: dict[tuple[str, str], list[float]] = {}  # (workload, variant) -> CPU s/op

        def timed(workload: str, step, count: int, warm: int = 20):
            """One round of ``count`` awaited ``step()``s; the thread's CPU time per step is
            kept beside the wall time (other processes on a shared machine disturb it less)."""

            async def run() -> float:
                for _ in range(warm):  # untimed: caches warm again after switching variants
                    await step()
                start, start_cpu = time.perf_counter(), time.thread_time()
                for _ in range(count):
                    await step()
                variant = "poolwatch" if poolwatch.agent.agent.discovering else "bare"
                cpu.setdefault((workload, variant), []).append(
                    (time.thread_time() - start_cpu) / count
                )
                return (time.perf_counter() - start) / count

            return run

        def redis_cycle(pool):
            async def step() -> None:
                await pool.release(await pool.get_connection())

            return step

        async def psycopg_cycle() -> None:
            await psycopg.putconn(await psycopg.getconn())

        async def httpx_get() -> None:
            (await client.get(url)).read()

        workloads = {  # workload -> (title, one round)
            "redis": (
                "redis.asyncio ConnectionPool get_connection+release",
                timed("redis", redis_cycle(plain), cycles),
            ),
            "redis blocking": (
                "redis.asyncio BlockingConnectionPool get_connection+release",
                timed("redis blocking", redis_cycle(blocking), cycles),
            ),
            "psycopg": (
                "psycopg_pool AsyncConnectionPool getconn+putconn",
                timed("psycopg", psycopg_cycle, cycles),
            ),
            "httpx": (
                "httpx AsyncClient GET, one at a time, kept-alive loopback connection",
                timed("httpx", httpx_get, requests),
            ),
        }
        for _, run in workloads.values():  # warm up: connections open
            await run()
        cpu.clear()
        for workload, (title, run) in workloads.items():
            wall = await interleave({n: (s, run) for n, s in VARIANTS.items()}, rounds)
            report(f"{title}: wall", wall, "bare")
            cpu_medians = {v: statistics.median(cpu[(workload, v)]) for v in VARIANTS}
            report(f"{title}: the thread's CPU time", cpu_medians, "bare")
            added = (wall["poolwatch"] - wall["bare"]) * 1e6
            added_cpu = (cpu_medians["poolwatch"] - cpu_medians["bare"]) * 1e6
            percent = (wall["poolwatch"] / wall["bare"] - 1) * 100
            percent_cpu = (cpu_medians["poolwatch"] / cpu_medians["bare"] - 1) * 100
            if workload == "httpx":
                verdict = "meets" if percent <= 3 else "MISSES"
                verdicts.append(
                    f"{title}: poolwatch adds {percent:+.2f} % wall ({added:.2f} µs of "
                    f"{wall['bare'] * 1e6:.0f}), {percent_cpu:+.2f} % CPU; target <= 3 %: "
                    f"{verdict}"
                )
            else:
                verdict = "meets" if added <= 2.0 else "MISSES"
                verdicts.append(
                    f"{title}: poolwatch adds {added:.2f} µs wall ({percent:+.1f} %), "
                    f"{added_cpu:.2f} µs CPU per checkout; target <= 2 µs: {verdict}"
                )
        bare()
        print()
        print("\n".join(verdicts))
        await client.aclose()
        await psycopg.close()
        await plain.aclose()
        await blocking.aclose()
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        pg_support.remove(pg)
        redis_support.remove(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    asyncio.run(main(args.cycles, args.requests, args.rounds))
