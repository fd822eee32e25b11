"""Issue 3 benchmark: added cost per request through an instrumented aiohttp session.

    python -m bench.bench_aiohttp [--requests 100] [--rounds 61]

Sessions against a local aiohttp upstream (its own process, as in production), measured in
interleaved rounds (medians) in three variants:
- bare: no TraceConfig;
- empty TraceConfig: aiohttp's own tracing machinery with no receiver, the floor of any
  TraceConfig-based design (aiohttp builds a Trace and sends ~6 signals per request);
- poolwatch: ``instrument()`` finds the sessions and wraps the connector methods it times
  (``uninstrument()`` takes it out).
Workloads: "sequential", one request at a time over a kept-alive connection (the issue's
target: poolwatch adds <= 3 % of the bare request time); "queued", 8 concurrent requests
through ``limit=2``, so most requests wait for a connection and take the queued path too.
Each round starts with untimed requests: switching variants (``instrument()`` scans the heap
for sessions) leaves cold caches that would otherwise be charged to the next round.
Wall time is the target's measure; the client thread's CPU time per request is printed beside
it because other processes on a shared machine disturb it much less.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
from tests.support.net import free_port, wait_for_port

import poolwatch
from bench.common import interleave, report

UPSTREAM = """
import sys
from aiohttp import web

async def ok(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def main(requests: int, rounds: int) -> None:
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port)])
    try:
        wait_for_port(port, proc=upstream)
        url = f"http://127.0.0.1:{port}/"
        sequential_session = aiohttp.ClientSession()
        queued_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))

        cpu: dict[tuple[str, str], list[float]] = {}
        wall: dict[tuple[str, str], list[float]] = {}
        current = ["bare"]

        sessions = (sequential_session, queued_session)
        empty = aiohttp.TraceConfig()
        empty.freeze()

        def bare() -> None:
            poolwatch.uninstrument()
            for session in sessions:
                session._trace_configs = []
            current[0] = "bare"

        def with_empty_trace_config() -> None:
            bare()
            for session in sessions:
                session._trace_configs = [empty]
            current[0] = "empty TraceConfig"

        def with_poolwatch() -> None:
            bare()
            poolwatch.instrument(metrics_port=0)  # finds both sessions
            current[0] = "poolwatch"

        variants = {
            "bare": bare,
            "empty TraceConfig": with_empty_trace_config,
            "poolwatch": with_poolwatch,
        }

        def timed(kind: str, run: Any) -> Any:
            async def round_() -> float:
                await run(warm_up=True)
                start, start_cpu = time.perf_counter(), time.thread_time()
                count = await run()
                cpu.setdefault((kind, current[0]), []).append(
                    (time.thread_time() - start_cpu) / count
                )
                seconds = (time.perf_counter() - start) / count
                wall.setdefault((kind, current[0]), []).append(seconds)
                return seconds

            return round_

        async def fetch(session: aiohttp.ClientSession) -> None:
            async with session.get(url) as response:
                await response.read()

        async def sequential(warm_up: bool = False) -> int:
            count = 100 if warm_up else requests
            for _ in range(count):
                await fetch(sequential_session)
            return count

        async def queued(warm_up: bool = False) -> int:
            batches = 12 if warm_up else requests // 8
            for _ in range(batches):
                await asyncio.gather(*(fetch(queued_session) for _ in range(8)))
            return batches * 8

        sequential_round, queued_round = timed("sequential", sequential), timed("queued", queued)

        await sequential_round()  # warm up: connections open, code paths hot
        await queued_round()
        cpu.clear()
        wall.clear()
        sequential_wall = await interleave(
            {name: (switch, sequential_round) for name, switch in variants.items()}, rounds
        )
        report("aiohttp GET, one at a time, kept-alive connection: wall", sequential_wall, "bare")
        queued_wall = await interleave(
            {name: (switch, queued_round) for name, switch in variants.items()}, rounds
        )
        report("aiohttp GET, 8 concurrent through limit=2: wall", queued_wall, "bare")
        bare()
        cpu_medians = {key: statistics.median(values) for key, values in cpu.items()}
        for kind in ("sequential", "queued"):
            medians = {v: cpu_medians[(kind, v)] for v in variants}
            report(f"{kind}: client thread CPU time", medians, "bare")
        print()
        for kind, medians in (("sequential", sequential_wall), ("queued", queued_wall)):
            added = (medians["poolwatch"] - medians["bare"]) * 1e6
            percent = (medians["poolwatch"] / medians["bare"] - 1) * 100
            added_cpu = (cpu_medians[(kind, "poolwatch")] - cpu_medians[(kind, "bare")]) * 1e6
            verdict = "meets" if percent <= 3.0 else "MISSES"
            quartiles = statistics.quantiles(wall[(kind, "bare")], n=4)
            noise = (quartiles[2] - quartiles[0]) / medians["bare"] * 100
            print(
                f"{kind}: poolwatch adds {added:.2f} µs/request = {percent:+.2f} % of "
                f"{medians['bare'] * 1e6:.1f} µs wall ({added_cpu:.2f} µs client CPU); "
                f"target <= 3 %: {verdict} (bare rounds' wall IQR: {noise:.0f} % of median)"
            )
        await sequential_session.close()
        await queued_session.close()
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=61)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
