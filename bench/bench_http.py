"""Issue 5 benchmark: HTTP throughput of an instrumented app relative to the same app bare.

    python -m bench.bench_http [--duration 2] [--rounds 11] [--connections 32] [--variants a,b]

FastAPI + uvicorn (uvloop, httptools, no access log), one worker pinned to CPU 0, loaded by
``wrk`` pinned to CPU 1 over loopback. Two routes: a trivial JSON route and a route doing one
query through a SQLAlchemy async engine (asyncpg) on a real PostgreSQL. Every variant runs as its
own server, all started up front; every round runs each variant once (wrk one at a time, in a
new random order). Reported: medians of req/s, of the per-round throughput ratio to bare, of the
server's CPU time per request and of its per-round ratio to bare's; and, in process, the time
each instrumentation adds to one request.

Variants: bare; a no-op ASGI middleware (the control); poolwatch (every probe on, /metrics
listening); poolwatch + OTLP export every second to a loopback receiver; poolwatch in tracing
mode (OpenTelemetry's ASGI middleware, SDK tracer exporting spans);
prometheus-fastapi-instrumentator; starlette-exporter; OpenTelemetry's ASGI middleware with the
no-op tracer/meter and with SDK providers.
Targets (issue 5): poolwatch >= 0.95 of bare on the trivial route, >= 0.97 on the one-query route.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import http.client
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

from aiohttp import web
from tests.support.apps import REPO, AppServer, start_app
from tests.support.net import free_port, wait_for_port
from tests.support.postgres import remove, start_postgres

from bench.common import interleave, report

VARIANTS = [
    "bare",
    "noop-middleware",  # control: one pure ASGI middleware doing nothing (noise shows here)
    "poolwatch",
    "poolwatch-diagnosis-off",  # every probe but the anti-pattern detectors (their cost, beside)
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
        with contextlib.suppress(ConnectionError):  # a server stopped mid-export
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


class Run(NamedTuple):
    rps: float  # wrk's requests per second
    cpu_us: float  # CPU time the server process spent per request, all threads


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (``/proc/<pid>/task/*/schedstat``, ns)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError), open(path) as stat:  # a thread may just have ended
            total += int(stat.read().split()[0])
    return total


def wrk(url: str, seconds: int, connections: int, pid: int) -> Run:
    """One wrk run against the server ``pid`` (non-2xx answers make the run invalid)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(LOAD_CPU), *cmd]
    before = cpu_ns(pid)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    cpu = cpu_ns(pid) - before
    rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    requests = re.search(r"(\d+) requests in", done.stdout)
    if rps is None or requests is None or "Non-2xx" in done.stdout or "Socket" in done.stdout:
        raise RuntimeError(f"wrk failed or saw errors on {url}:\n{done.stdout}{done.stderr}")
    return Run(float(rps.group(1)), cpu / 1000 / int(requests.group(1)))


def measure(
    servers: dict[str, AppServer], path: str, duration: int, rounds: int, connections: int
) -> dict[str, tuple[float, ...]]:
    """variant -> medians of (req/s, its ratio to bare's in the same round, server CPU µs per
    request, bare's CPU per request / its own in the same round).

    Not ``bench.common.interleave``: on a shared machine the drift between rounds is larger than
    the effect measured, so each run is compared with the bare run of the same round (variants
    in a new random order every round). The server's CPU time per request is the steadier
    figure: with a core of its own the server's throughput is 1 / that time, so bare's time /
    the variant's is the throughput ratio without other processes' interference.
    """
    for server in servers.values():  # warm-up: connections open, code paths hot
        wrk(server.url + path, 1, connections, server.proc.pid)
    rows: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in servers}
    for _ in range(rounds):
        order = random.sample(list(servers), len(servers))
        runs = {
            v: wrk(servers[v].url + path, duration, connections, servers[v].proc.pid) for v in order
        }
        bare = runs["bare"]
        for variant, run in runs.items():
            rows[variant].append(
                (run.rps, run.rps / bare.rps, run.cpu_us, bare.cpu_us / run.cpu_us)
            )
    return {
        variant: tuple(statistics.median(column) for column in zip(*row, strict=True))
        for variant, row in rows.items()
    }


def print_report(results, variants, duration: int, rounds: int, connections: int) -> None:
    print(
        f"\nFastAPI + uvicorn (uvloop, httptools), wrk -t1 -c{connections} -d{duration}s, "
        f"{rounds} rounds in random order, medians; server on CPU {SERVER_CPU}, wrk on CPU "
        f"{LOAD_CPU}.\nratio: throughput / bare's in the same round; cpu ratio: bare's server "
        "CPU time per request / the variant's (the throughput ratio on a core of its own)."
    )
    for route, by_variant in results.items():
        title = f"{route} route"
        print(f"\n{title:<36}{'req/s':>8}{'ratio':>8}{'CPU µs/req':>12}{'cpu ratio':>11}")
        for variant in variants:
            rps, ratio, cpu_us, cpu_ratio = by_variant[variant]
            print(f"{variant:<36}{rps:>8.0f}{ratio:>8.3f}{cpu_us:>12.1f}{cpu_ratio:>11.3f}")
    if "poolwatch" in variants:
        print()
        for route, by_variant in results.items():
            _, ratio, _, cpu_ratio = by_variant["poolwatch"]
            target = TARGETS[route]
            verdicts = ["meets" if r >= target else "MISSES" for r in (ratio, cpu_ratio)]
            print(
                f"{route}: poolwatch throughput {ratio:.3f} of bare ({verdicts[0]}), "
                f"CPU-time ratio {cpu_ratio:.3f} ({verdicts[1]}); target >= {target}"
            )


class Count(NamedTuple):
    per_request: float  # all the server's instructions while the requests ran, / requests
    requests_per_second: float  # under valgrind


def stretched(variant: str, dsn: str, receiver: str, stretch: float) -> dict[str, str]:
    """The variant's settings with every period multiplied by ``stretch``.

    Under valgrind a request takes ~50x longer but timers keep wall-clock time: with the
    default settings each request would be charged ~50x the loop-probe ticks, watchdog
    wake-ups and OTLP exports it shares at real speed, and a loop iteration serving 32 ready
    requests (~3 ms at real speed) would outlast the 100 ms block threshold and be reported as a
    block. Periods stretched by the slowdown measured on the bare server (its req/s under
    valgrind vs wrk's) make each request share what it shares at real speed."""
    from poolwatch.config import Settings

    env = variant_env(variant, dsn, receiver)
    env["POOLWATCH_LOOP_INTERVAL"] = f"{Settings().loop_interval * stretch:.4f}"
    env["POOLWATCH_BLOCK_THRESHOLD"] = f"{Settings().block_threshold * stretch:.4f}"
    if "OTEL_METRIC_EXPORT_INTERVAL" in env:
        env["OTEL_METRIC_EXPORT_INTERVAL"] = str(
            int(int(env["OTEL_METRIC_EXPORT_INTERVAL"]) * stretch)
        )
    return env


def instructions(env: dict[str, str], path: str, requests: int, connections: int) -> Count:
    """CPU instructions a server executes per request of ``path``, counted by valgrind's
    callgrind: exact and blind to other processes, unlike time on a shared machine. One server
    per route (its periods are stretched for that route), ``connections`` keep-alive clients as
    under wrk (so the one-query route's requests queue for the pool's 20 connections, as they
    do under load), counting only while they run, every thread included."""
    port, workdir = free_port(), tempfile.mkdtemp(prefix="poolwatch-callgrind-")
    out = os.path.join(workdir, "callgrind.out")
    env = {**os.environ, **env, "POOLWATCH_METRICS_PORT": "0", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "agent")])
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    cmd += [sys.executable, "-m", "uvicorn", "bench.http_app:app", "--port", str(port)]
    cmd += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    # keep-alive beyond valgrind's pauses: uvicorn closes a connection idle for 5 s, and a client
    # whose request then failed left fewer requests counted than divided by
    cmd += ["--timeout-keep-alive", "3600"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True)

    answered: list[int] = []  # requests answered 200, whatever happened to the others

    def get_each(client: http.client.HTTPConnection, n: int) -> None:
        for _ in range(n):
            client.request("GET", path)
            response = client.getresponse()
            response.read()
            assert response.status == 200, f"{env['BENCH_VARIANT']} {path}: {response.status}"
            answered.append(1)

    def get(n: int) -> int:
        """``n`` requests spread over the clients, all of them at once (threads)."""
        each = n // connections
        threads = [threading.Thread(target=get_each, args=(c, each)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(answered) != each * connections:
            raise RuntimeError(f"{len(answered)} of {each * connections} requests answered")
        answered.clear()
        return each * connections

    try:
        wait_for_port(port, timeout=600, proc=proc)
        clients = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(connections)
        ]
        # Instrumentation on before the warm-up: switching it on drops valgrind's translations,
        # and the slow re-translation that follows must not fall into the counted window.
        control("-i", "on")
        get(10 * connections)
        control("-z")
        start = time.perf_counter()
        done = get(requests)
        seconds = time.perf_counter() - start
        control("-d")
        dumps = sorted(glob.glob(f"{out}.*"), key=os.path.getmtime)
        with open(dumps[-1]) as dump:
            totals = [line for line in dump if line.startswith(("summary:", "totals:"))]
        for client in clients:
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)
    return Count(int(totals[-1].split()[1]) / done, done / seconds)


def count_instructions(
    variants: list[str], results, dsn: str, receiver: str, requests: int, connections: int
) -> None:
    print(
        f"\nCPU instructions the server executes per request (valgrind callgrind, every thread, "
        f"{requests} requests over {connections} concurrent connections; periods stretched by "
        "valgrind's slowdown, see stretched()); ratio: bare's / the variant's"
    )
    for route, path in ROUTES.items():
        bare = instructions(variant_env("bare", dsn, receiver), path, requests, connections)
        stretch = results[route]["bare"][0] / bare.requests_per_second
        title = f"{route} route (slowdown {stretch:.0f}x)"
        print(f"\n{title:<36}{'instr/req':>12}{'ratio':>8}")
        for variant in variants:
            env = stretched(variant, dsn, receiver, stretch)
            count = bare if variant == "bare" else instructions(env, path, requests, connections)
            ratio = bare.per_request / count.per_request
            print(f"{variant:<36}{count.per_request:>12,.0f}{ratio:>8.3f}")


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
    short = {"prometheus-fastapi-instrumentator": "prom-fastapi-instrumentator"}  # column width
    variants = {short.get(n, n): (lambda: None, timed(a)) for n, a in apps.items()}
    medians = await interleave(variants, rounds * 3)
    report("In process, trivial route, time per request (ratio of times)", medians, "bare")


def main(
    duration: int, rounds: int, connections: int, variants: list[str], count: int | None
) -> None:
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
        if count:
            for server in servers.values():  # valgrind wants the CPU to itself
                server.stop()
            count_instructions(variants, results, dsn, receiver, count, connections)
    finally:
        for server in servers.values():
            server.stop()
        remove(pg)
    asyncio.run(in_process(rounds))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="also count CPU instructions per request over N requests under valgrind "
        "(apt-get install valgrind; about a minute per variant)",
    )
    args = parser.parse_args()
    main(args.duration, args.rounds, args.connections, args.variants.split(","), args.instructions)
