"""Issue 10 benchmark: what leak detection adds per checkout+checkin cycle, real PostgreSQL.

    python -m bench.bench_leaks [--cycles 2000] [--rounds 9] [--depth 40]

Variants, interleaved in one run (medians): bare; poolwatch with leak detection off (the
default); poolwatch with ``leak_threshold=30`` (each checkout notes route, task and stack).
Checkouts run ``--depth`` coroutine frames deep, like a handler under uvicorn+FastAPI (~45
frames), because the stack captured at checkout grows with depth.
Each round is timed twice: wall clock (what a request feels) and this process's CPU time
(``time.process_time``, all threads: the checker included), which other load on a shared
machine disturbs much less.
Target (issue 10): zero cost when off (the probes' code path is unchanged: ``held`` is a plain
dict); when on, the cost is measured and printed here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tests.support.postgres import remove, start_postgres

import poolwatch
from bench.common import interleave, report
from poolwatch.agent import agent


async def nested(depth: int, run):
    """``run()`` awaited ``depth`` coroutine frames below this one."""
    if depth <= 0:
        return await run()
    return await nested(depth - 1, run)


async def main(cycles: int, rounds: int, depth: int) -> None:
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    pg = start_postgres()
    try:
        engine = create_async_engine(pg.dsn("postgresql+asyncpg"), pool_size=5)

        async def no_reset(connection) -> None:  # measure the pool, not SQL
            pass

        pool = await asyncpg.create_pool(pg.dsn(), min_size=5, max_size=5, reset=no_reset)

        variant = ["bare"]
        cpu: dict[str, list[float]] = {}  # variant -> CPU seconds/op of each round

        def bare():
            variant[0] = "bare"
            poolwatch.uninstrument()

        def leaks_off():
            variant[0] = "poolwatch, leaks off"
            poolwatch.uninstrument()
            poolwatch.instrument(metrics_port=0)  # finds the existing engine and pool
            agent.start()

        def leaks_on():
            variant[0] = "poolwatch, leaks on"
            poolwatch.uninstrument()
            poolwatch.instrument(metrics_port=0, leak_threshold=30)
            agent.start()  # the checker thread runs meanwhile, as in production

        def timed(run):
            async def cycles_timed() -> float:
                wall, cpu_start = time.perf_counter(), time.process_time()
                await run()
                cpu.setdefault(variant[0], []).append((time.process_time() - cpu_start) / cycles)
                return (time.perf_counter() - wall) / cycles

            return cycles_timed

        @timed
        async def sa_cycles() -> None:
            for _ in range(cycles):
                async with engine.connect():
                    pass

        @timed
        async def apg_cycles() -> None:
            for _ in range(cycles):
                async with pool.acquire():
                    pass

        async def sa_round() -> float:
            return await nested(depth, sa_cycles)

        async def apg_round() -> float:
            return await nested(depth, apg_cycles)

        await sa_round()  # warm up: connections open, statements cached
        await apg_round()
        results = {}
        for title, run in (
            ("SQLAlchemy AsyncEngine (asyncpg) checkout+checkin", sa_round),
            ("asyncpg Pool acquire+release (no-op reset)", apg_round),
        ):
            cpu.clear()
            wall = await interleave(
                {
                    "bare": (bare, run),
                    "poolwatch, leaks off": (leaks_off, run),
                    "poolwatch, leaks on": (leaks_on, run),
                },
                rounds,
            )
            cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
            report(f"{title}, PostgreSQL, {depth} frames deep: wall clock", wall, "bare")
            report(f"{title}, PostgreSQL, {depth} frames deep: CPU time", cpu_medians, "bare")
            results[title.split()[0]] = (wall, cpu_medians)
        bare()
        print()
        for name, (wall, cpu_medians) in results.items():
            for clock, medians in (("wall", wall), ("CPU", cpu_medians)):
                off = medians["poolwatch, leaks off"]
                on = medians["poolwatch, leaks on"]
                print(
                    f"{name} ({clock}): leak detection on adds {(on - off) * 1e6:.2f} µs/cycle "
                    f"over off (on/off {on / off:.3f}, on/bare {on / medians['bare']:.3f})"
                )
        print("leaks off is the issue-2 code path, unchanged (held is a plain dict)")
        await pool.close()
        await engine.dispose()
    finally:
        remove(pg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--depth", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.cycles, args.rounds, args.depth))
