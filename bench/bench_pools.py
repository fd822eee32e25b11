"""Issue 2 benchmark: added cost per pool checkout+checkin cycle, against a real PostgreSQL.

    python -m bench.bench_pools [--cycles 2000] [--rounds 9]

Variants, interleaved in one run: bare; poolwatch; and (SQLAlchemy only) event listeners in the
style of the prometheus_client docs (a Histogram/Gauge updated in checkout/checkin listeners).
Target (issue 2): poolwatch adds <= 2 µs per cycle (<= 5 %) for SQLAlchemy and asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tests.support.postgres import remove, start_postgres

import poolwatch
from bench.common import interleave, report


def prometheus_docs_listeners(engine):
    """What users write today from the prometheus_client docs: labelled metrics in listeners."""
    from prometheus_client import CollectorRegistry, Gauge, Histogram
    from sqlalchemy import event

    registry = CollectorRegistry()
    in_use = Gauge("db_in_use", "in use", ["pool"], registry=registry)
    hold = Histogram("db_hold_seconds", "hold", ["pool"], registry=registry)
    started = {}

    def on_checkout(dbapi_conn, record, proxy):
        in_use.labels("main").inc()
        started[id(record)] = time.perf_counter()

    def on_checkin(dbapi_conn, record):
        in_use.labels("main").dec()
        if (t := started.pop(id(record), None)) is not None:
            hold.labels("main").observe(time.perf_counter() - t)

    def attach():
        event.listen(engine.sync_engine.pool, "checkout", on_checkout)
        event.listen(engine.sync_engine.pool, "checkin", on_checkin)

    def detach():
        if event.contains(engine.sync_engine.pool, "checkout", on_checkout):
            event.remove(engine.sync_engine.pool, "checkout", on_checkout)
            event.remove(engine.sync_engine.pool, "checkin", on_checkin)

    return attach, detach


async def main(cycles: int, rounds: int) -> None:
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    pg = start_postgres()
    try:
        engine = create_async_engine(pg.dsn("postgresql+asyncpg"), pool_size=5)

        async def no_reset(
            connection,
        ) -> None:  # the "no-op reset": measure the pool, not SQL
            pass

        pool = await asyncpg.create_pool(pg.dsn(), min_size=5, max_size=5, reset=no_reset)
        attach, detach = prometheus_docs_listeners(engine)

        def bare():
            detach()
            poolwatch.uninstrument()

        def with_poolwatch():
            detach()
            poolwatch.instrument(metrics_port=0)  # finds the existing engine and pool

        def with_docs_listeners():
            poolwatch.uninstrument()
            attach()

        async def sa_round() -> float:
            start = time.perf_counter()
            for _ in range(cycles):
                async with engine.connect():
                    pass
            return (time.perf_counter() - start) / cycles

        async def apg_round() -> float:
            start = time.perf_counter()
            for _ in range(cycles):
                async with pool.acquire():
                    pass
            return (time.perf_counter() - start) / cycles

        await sa_round()  # warm up: connections open, statements cached
        await apg_round()
        sa = await interleave(
            {
                "bare": (bare, sa_round),
                "poolwatch": (with_poolwatch, sa_round),
                "prometheus_client listeners": (with_docs_listeners, sa_round),
            },
            rounds,
        )
        report("SQLAlchemy AsyncEngine (asyncpg) checkout+checkin, PostgreSQL", sa, "bare")
        apg = await interleave(
            {"bare": (bare, apg_round), "poolwatch": (with_poolwatch, apg_round)}, rounds
        )
        report("asyncpg Pool acquire+release (no-op reset), PostgreSQL", apg, "bare")
        bare()
        for title, medians in (("SQLAlchemy", sa), ("asyncpg", apg)):
            added = (medians["poolwatch"] - medians["bare"]) * 1e6
            ratio = medians["poolwatch"] / medians["bare"]
            verdict = "meets" if added <= 2.0 else "MISSES"
            print(
                f"{title}: poolwatch adds {added:.2f} µs/cycle (ratio {ratio:.3f}); "
                f"target <= 2 µs: {verdict}"
            )
        await pool.close()
        await engine.dispose()
    finally:
        remove(pg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(main(args.cycles, args.rounds))
