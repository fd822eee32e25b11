"""Issue 21 benchmark: what each anti-pattern detector adds per request and per query.

    python -m bench.bench_diagnosis [--requests 300] [--rounds 15]

First the detectors' own code, timed alone. Then, in process, one run, interleaved rounds in
random order, the least of each (see ``least``): a FastAPI app driven through its ASGI
interface, each request in a task of its own as uvicorn runs it, on a real PostgreSQL
(SQLAlchemy AsyncEngine, asyncpg driver). Routes: trivial (no query), one query, and ten
queries (per query: the ten-query route's added time less the one-query's, / 9).

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
import random
import time
import timeit

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tests.support.postgres import remove, start_postgres

import poolwatch
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


async def least(variants, rounds: int) -> dict[str, float]:
    """Like ``bench.common.interleave`` (rounds alternate between the variants, in a new random
    order each round) but the minimum: on a machine shared with other processes the noise only
    ever adds CPU time (caches, frequency), so the least round is the steadiest estimate."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in random.sample(list(variants), len(variants)):
            switch, run = variants[name]
            switch()
            times[name].append(await run())
    return {name: min(values) for name, values in times.items()}


def hook_costs() -> dict[str, float]:
    """The detectors' own code, timed alone (timeit, best of 7): what each adds per request,
    per statement, per AsyncSession call and per task."""
    from poolwatch.context import QUERIES, request_scope
    from poolwatch.probes import diagnosis

    poolwatch.instrument(metrics_port=0, diagnose="all")
    found = poolwatch.agent.agent.diagnosis
    assert found is not None
    scope = {"type": "http", "method": "GET", "path": "/"}

    def per_request() -> None:  # what PoolwatchMiddleware does per request with diagnosis on
        token = request_scope.set(scope)
        request_scope.reset(token)
        if QUERIES in scope:  # a request without a query: no more
            found.finished(scope)

    queried = {**scope, QUERIES: {"SELECT 1": 1}}

    def per_queried_request() -> None:  # ... and for one that ran a query: its histogram too
        token = request_scope.set(queried)
        request_scope.reset(token)
        if QUERIES in queried:
            found.finished(queried)

    def per_statement() -> None:
        found.query("SELECT a FROM t WHERE id = $1")

    def best(fn, number: int = 20000) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number

    token = request_scope.set(scope)
    costs = {
        "per request without a query (scope set)": best(per_request),
        "per request with queries (+ its histogram)": best(per_queried_request),
        "per statement (n_plus_one, in a request)": best(per_statement),
    }
    request_scope.reset(token)
    costs["per statement (outside a request)"] = best(per_statement)

    async def session_calls() -> tuple[float, float]:
        async def call(self):
            return None

        wrapped = diagnosis._make_session_method(call)
        n = 20000
        times = {}
        for name, fn in (("bare", call), ("wrapped", wrapped)):
            runs = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(n):
                    await fn(scope)
                runs.append((time.perf_counter() - start) / n)
            times[name] = min(runs)
        return times["bare"], times["wrapped"]

    async def tasks() -> tuple[float, float]:
        loop = asyncio.get_running_loop()

        async def nothing():
            return None

        n = 5000
        times = {}
        for name, factory in (("bare", None), ("factory", diagnosis._task_factory)):
            loop.set_task_factory(factory)
            runs = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(n):
                    await loop.create_task(nothing())
                runs.append((time.perf_counter() - start) / n)
            times[name] = min(runs)
        loop.set_task_factory(None)
        return times["bare"], times["factory"]

    bare, wrapped = asyncio.run(session_calls())
    costs["per AsyncSession call (shared_async_session)"] = wrapped - bare
    bare, factory = asyncio.run(tasks())
    costs["per task (swallowed_cancel's task factory)"] = factory - bare
    poolwatch.uninstrument()
    return costs


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
            results[route] = await least(
                {name: (variant(d), run) for name, d in variants.items()}, rounds
            )
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
        "interleaved, the least of the loop thread's CPU µs per request. ratio: to bare; added: "
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
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print("\nThe detectors' own code alone (timeit, best of 7), µs:")
    for what, seconds in hook_costs().items():
        print(f"  {what:<48}{seconds * 1e6:>8.3f}")
    asyncio.run(main(args.requests, args.rounds))
