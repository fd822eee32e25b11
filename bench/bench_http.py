"""Issue 5 benchmark: HTTP throughput of an instrumented app relative to the same app bare.

    python -m bench.bench_http [--duration 2] [--rounds 11] [--connections 32] [--variants a,b]

FastAPI + uvicorn (uvloop, httptools, no access log), one worker pinned to CPU 0, loaded by
``wrk`` pinned to CPU 1 over loopback. Two routes: a trivial JSON route and a route doing one
query through a SQLAlchemy async engine (asyncpg) on a real PostgreSQL. Every variant runs as its
own server, all started up front; every round runs each variant once (wrk one at a time, in a
new random order), and the medians of the per-round ratios to bare are reported.

Variants: bare; poolwatch (every probe on, /metrics listening); poolwatch + OTLP export every
second to a loopback receiver; poolwatch in tracing mode (OpenTelemetry's ASGI middleware, SDK
tracer exporting spans); prometheus-fastapi-instrumentator; starlette-exporter; OpenTelemetry's
ASGI middleware with the no-op tracer/meter and with SDK providers.
Targets (issue 5): poolwatch >= 0.95 of bare on the trivial route, >= 0.97 on the one-query route.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import threading
import time

from aiohttp import web
from tests.support.apps import AppServer, start_app
from tests.support.net import free_port
from tests.support.postgres import remove, start_postgres

from bench.common import interleave, report

VARIANTS = [
    "bare",
    "poolwatch",
    "poolwatch+otlp",
    "poolwatch+tracing",
    "prometheus-fastapi-instrumentator",
    "starlette-exporter",
    "otel-asgi",
    "otel-asgi+sdk",
]
ROUTES = {"trivial": "/", "one query": "/query/7"}
TARGETS = {"trivial": 0.95, "one query": 0.97}
SERVER_CPU, LOAD_CPU = 0, 1


def start_receiver() -> str:
    """A loopback OTLP/HTTP sink (answers 200, keeps nothing) on its own thread and loop."""
    port = free_port()
    ready = threading.Event()

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/metrics", ok)
        app.router.add_post("/v1/traces", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    ready.wait(10)
    return f"http://127.0.0.1:{port}"


def variant_env(variant: str, dsn: str, receiver: str) -> dict[str, str]:
    env = {"BENCH_VARIANT": variant, "BENCH_DSN": dsn, "BENCH_OTLP": receiver}
    if variant == "poolwatch+otlp":
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver, "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    if variant == "poolwatch+tracing":
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver, "OTEL_METRICS_EXPORTER": "none"}
    return env


def wrk(url: str, seconds: int, connections: int) -> float:
    """Requests per second of one wrk run (non-2xx answers make the run invalid)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(LOAD_CPU), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if found is None or "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk failed or saw errors on {url}:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


def main(duration: int, rounds: int, connections: int, variants: list[str]) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    variants = ["bare", *(v for v in variants if v != "bare")]
    pg = start_postgres()
    servers: dict[str, AppServer] = {}
    try:
        receiver = start_receiver()
        dsn = pg.dsn("postgresql+asyncpg")
        for variant in variants:
            server = start_app(
                "bench.http_app:app",
                variant_env(variant, dsn, receiver),
                server_args=["--loop", "uvloop", "--http", "httptools", "--no-access-log"],
                metrics=variant.startswith("poolwatch"),
            )
            servers[variant] = server
            os.sched_setaffinity(server.proc.pid, {SERVER_CPU})
        results = {
            route: measure(servers, path, duration, rounds, connections)
            for route, path in ROUTES.items()
        }
        print_report(results, variants, duration, rounds, connections)
    finally:
        for server in servers.values():
            server.stop()
        remove(pg)
    asyncio.run(in_process(rounds))


async def in_process(rounds: int, requests: int = 3000) -> None:
    """Microseconds each instrumentation adds to one request of the trivial route, measured in
    one process without sockets or load generator: far less noisy than throughput on a shared
    machine, and the numbers behind the ratios above."""
    os.environ["POOLWATCH_METRICS_PORT"] = "0"
    from bench.http_app import make_app

    names = ["bare", "poolwatch", "prometheus-fastapi-instrumentator", "starlette-exporter"]
    apps = {name: make_app(name) for name in [*names, "otel-asgi"]}  # otel: no-op providers
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET"}
    scope |= {"scheme": "http", "path": "/", "raw_path": b"/", "root_path": "", "headers": []}
    scope |= {"query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5)}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    def timed(app):
        async def one_round() -> float:
            start = time.perf_counter()
            for _ in range(requests):
                await app(dict(scope), receive, send)
            return (time.perf_counter() - start) / requests

        return one_round

    for app in apps.values():
        await timed(app)()  # warm up
    medians = await interleave({n: (lambda: None, timed(a)) for n, a in apps.items()}, rounds * 3)
    report(
        "In process, trivial route, time per request (ratio = time, not throughput)",
        medians,
        "bare",
    )


def measure(
    servers: dict[str, AppServer], path: str, duration: int, rounds: int, connections: int
) -> dict[str, tuple[float, float]]:
    """variant -> (median req/s, median of its per-round ratio to bare).

    Not ``bench.common.interleave``: on a shared machine the drift between rounds is larger than
    the effect measured, so each round's runs are compared with the bare run of the same round
    (variants in a new random order every round), and the median of those ratios is reported.
    """
    for server in servers.values():  # warm-up: connections open, code paths hot
        wrk(server.url + path, 1, connections)
    rps: dict[str, list[float]] = {v: [] for v in servers}
    ratios: dict[str, list[float]] = {v: [] for v in servers}
    for _ in range(rounds):
        order = random.sample(list(servers), len(servers))
        this_round = {v: wrk(servers[v].url + path, duration, connections) for v in order}
        for variant, value in this_round.items():
            rps[variant].append(value)
            ratios[variant].append(value / this_round["bare"])
    return {v: (statistics.median(rps[v]), statistics.median(ratios[v])) for v in servers}


def print_report(results, variants, duration: int, rounds: int, connections: int) -> None:
    print(
        f"\nFastAPI + uvicorn (uvloop, httptools), wrk -t1 -c{connections} -d{duration}s, "
        f"{rounds} rounds in random order; median req/s and median per-round ratio to bare; "
        f"server on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU}"
    )
    header = "".join(f"{name + ' req/s':>18}{'ratio':>8}" for name in results)
    print(f"{'variant':<36}{header}")
    for variant in variants:
        row = "".join(f"{r[variant][0]:>18.0f}{r[variant][1]:>8.3f}" for r in results.values())
        print(f"{variant:<36}{row}")
    if "poolwatch" in variants:
        for route, by_variant in results.items():
            ratio = by_variant["poolwatch"][1]
            verdict = "meets" if ratio >= TARGETS[route] else "MISSES"
            print(f"{route}: poolwatch {ratio:.3f} of bare; target >= {TARGETS[route]}: {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = parser.parse_args()
    main(args.duration, args.rounds, args.connections, args.variants.split(","))
