"""Issue 21 benchmark: what each anti-pattern detector adds per request and per query.

    python -m bench.bench_diagnosis [--requests 2000] [--rounds 9]

In process, one run, interleaved rounds (``bench.common.interleave``), medians: a FastAPI app
driven through its ASGI interface, each request in a task of its own as uvicorn runs it, on a
real PostgreSQL (SQLAlchemy AsyncEngine, asyncpg driver). Routes: trivial (no query), one query,
and ten queries (per query: the ten-query route's added time less the one-query's, / 9).

Measured: the CPU time of the thread running the event loop (``time.thread_time``), not wall
time: the database's own time and other processes on a shared machine stay out of it, and the
detectors' cost is all on that thread.

Variants: bare (no poolwatch); poolwatch with every detector off (``POOLWATCH_DIAGNOSE=off``:
the other probes' cost, known from bench_http/bench_pools); each detector alone; the default
set; all. Each is reported as a ratio to bare and as µs added over "diagnosis off", which is
the detector's own cost. Targets (issues 2 and 5): the HTTP routes within 0.95 (trivial) and
0.97 (one query) of bare with the default set; the per-checkout cost is bench_pools'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tests.support.postgres import remove, start_postgres

import poolwatch
from bench.common import interleave
from poolwatch.config import DEFAULT_DETECTORS, DETECTORS


def make_app(engine, instrumented: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def trivial():
        return {"ok": True}

    @app.get("/query/{n}")
    async def one_query(n: int):
        async with engine.connect() as conn:
            return {"v": (await conn.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar()}

    @app.get("/queries/{n}")
    async def ten_queries(n: int):
        async with engine.connect() as conn:
            for i in range(10):
                await conn.execute(text("SELECT CAST(:n AS int) + :i"), {"n": n, "i": i})
        return {"ok": True}

    if instrumented:
        poolwatch.instrument(app, metrics_port=0)  # its middleware; the variant sets the rest
    return app


async def request(app, path: str) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await asyncio.get_running_loop().create_task(app(scope, receive, send))  # as uvicorn does
    assert sent and sent[0]["status"] == 200, sent


async def main(requests: int, rounds: int) -> None:
    pg = start_postgres()
    try:
        engine = create_async_engine(pg.dsn("postgresql+asyncpg"), pool_size=5)
        bare_app = make_app(engine, instrumented=False)
        app = make_app(engine, instrumented=True)
        poolwatch.uninstrument()

        def variant(diagnose: str | None):
            def switch() -> None:
                poolwatch.uninstrument()
                if diagnose is not None:
                    poolwatch.instrument(metrics_port=0, diagnose=diagnose)
                    poolwatch.agent.agent.start()  # in the loop: the detectors serve from now

            return switch

        variants = {"bare": None, "diagnosis off": "off"}
        variants |= {kind: kind for kind in DETECTORS}
        variants |= {"default set": "default", "all": "all"}
        results = {}
        for route, path in (("trivial", "/"), ("one query", "/query/7"), ("ten", "/queries/7")):

            async def run(path=path) -> float:
                target = bare_app if poolwatch.agent.agent.settings is None else app
                start = time.thread_time()
                for _ in range(requests):
                    await request(target, path)
                return (time.thread_time() - start) / requests

            for diagnose in ("off", None):
                variant(diagnose)()
                await run()  # warm up both apps
            table = {name: (variant(d), run) for name, d in variants.items()}
            results[route] = await interleave(table, rounds)
        poolwatch.uninstrument()
        print_report(results, requests, rounds)
        await engine.dispose()
    finally:
        with contextlib.suppress(Exception):
            poolwatch.uninstrument()
        remove(pg)


def print_report(results, requests: int, rounds: int) -> None:
    print(
        f"\nIn process, {requests} requests per round, each in its own task, {rounds} rounds "
        "interleaved, medians of the loop thread's CPU µs per request. ratio: to bare; added: "
        "µs over 'diagnosis off' (the detector's own cost); per query: (ten-query added - "
        "one-query added) / 9."
    )
    header = f"{'variant':<22}"
    for route in results:
        header += f"{route + ' µs':>14}{'ratio':>7}{'added':>7}"
    print(header + f"{'per query':>11}")
    for name in results["trivial"]:
        line = f"{name:<22}"
        added = {}
        for route, medians in results.items():
            value, bare, off = medians[name], medians["bare"], medians["diagnosis off"]
            added[route] = (value - off) * 1e6
            line += f"{value * 1e6:>14.1f}{value / bare:>7.3f}{added[route]:>7.2f}"
        per_query = (added["ten"] - added["one query"]) / 9
        print(line + f"{per_query:>11.2f}")
    default = sorted(DEFAULT_DETECTORS)
    print(f"\non by default: {', '.join(default)}")
    for route, target in (("trivial", 0.95), ("one query", 0.97)):
        ratio = results[route]["default set"] / results[route]["bare"]
        off = results[route]["diagnosis off"] / results[route]["bare"]
        print(
            f"{route}: bare / default set = {1 / ratio:.3f} (diagnosis off: {1 / off:.3f}); "
            f"target >= {target}: {'meets' if 1 / ratio >= target else 'MISSES'}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
