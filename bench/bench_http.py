"""Issue 5 benchmark: HTTP throughput of an instrumented app relative to the same app bare.

    python -m bench.bench_http [--duration 3] [--rounds 5] [--connections 32]

FastAPI + uvicorn (uvloop, httptools, no access log), one worker pinned to CPU 0, loaded by
``wrk`` pinned to CPU 1 over loopback. Two routes: a trivial JSON route and a route doing one
query through a SQLAlchemy async engine (asyncpg) on a real PostgreSQL. Every variant runs as its
own server, all started up front; rounds interleave the variants (wrk runs one at a time) and the
medians are compared. Variants: bare; poolwatch (every probe on, /metrics listening); poolwatch +
OTLP export every second to a loopback receiver; poolwatch in tracing mode (OpenTelemetry's ASGI
middleware, SDK tracer exporting spans); prometheus-fastapi-instrumentator; starlette-exporter;
OpenTelemetry's ASGI middleware with the no-op tracer/meter and with SDK providers.
Targets (issue 5): poolwatch >= 0.95 of bare on the trivial route, >= 0.97 on the one-query route.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import threading

from aiohttp import web
from tests.support.apps import AppServer, start_app
from tests.support.net import free_port
from tests.support.postgres import remove, start_postgres

from bench.common import interleave

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


async def main(duration: int, rounds: int, connections: int) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    pg = start_postgres()
    servers: dict[str, AppServer] = {}
    try:
        receiver = start_receiver()
        dsn = pg.dsn("postgresql+asyncpg")
        for variant in VARIANTS:
            server = start_app(
                "bench.http_app:app",
                variant_env(variant, dsn, receiver),
                server_args=["--loop", "uvloop", "--http", "httptools", "--no-access-log"],
                metrics=variant.startswith("poolwatch"),
            )
            servers[variant] = server
            os.sched_setaffinity(server.proc.pid, {SERVER_CPU})
        results: dict[str, dict[str, float]] = {}
        for route_name, path in ROUTES.items():
            for server in servers.values():  # warm-up: connections open, code paths hot
                wrk(server.url + path, 1, connections)

            def run(variant: str, path: str = path):
                async def one_round() -> float:
                    url = servers[variant].url + path
                    return 1 / await asyncio.to_thread(wrk, url, duration, connections)

                return one_round

            medians = await interleave({v: (lambda: None, run(v)) for v in VARIANTS}, rounds)
            results[route_name] = {v: 1 / seconds for v, seconds in medians.items()}
        print_report(results, duration, rounds, connections)
    finally:
        for server in servers.values():
            server.stop()
        remove(pg)


def print_report(results, duration: int, rounds: int, connections: int) -> None:
    print(
        f"\nFastAPI + uvicorn (uvloop, httptools), wrk -t1 -c{connections} -d{duration}s, "
        f"{rounds} interleaved rounds, medians; server on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU}"
    )
    header = "".join(f"{name + ' req/s':>18}{'ratio':>8}" for name in results)
    print(f"{'variant':<36}{header}")
    for variant in VARIANTS:
        row = ""
        for medians in results.values():
            row += f"{medians[variant]:>18.0f}{medians[variant] / medians['bare']:>8.3f}"
        print(f"{variant:<36}{row}")
    for route, medians in results.items():
        ratio = medians["poolwatch"] / medians["bare"]
        verdict = "meets" if ratio >= TARGETS[route] else "MISSES"
        print(f"{route}: poolwatch {ratio:.3f} of bare; target >= {TARGETS[route]}: {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.rounds, args.connections))
