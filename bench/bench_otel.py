"""What poolwatch costs beside OpenTelemetry's own instrumentation, in one process.

    python -m bench.bench_otel [--rounds 15] [--requests 2000]

A FastAPI app instrumented by OpenTelemetry's FastAPI instrumentation, with SDK tracer and meter
providers set globally (as the ``opentelemetry-instrument`` distro sets them; spans go to a
processor-less provider, metrics to an in-memory reader). Measured side by side, interleaved
rounds, medians:

1. Time per request of the trivial route: OpenTelemetry alone; plus poolwatch as it runs there
   (its ``http.server.*`` stepped aside); plus poolwatch recording its HTTP metrics too (what
   stepping aside saves: the same requests counted a second time).
2. Time of one collection of the app's reader: the app's metrics alone, and with poolwatch's
   joined (its registry read and converted, off the request path, once per export).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from bench.common import interleave, report


async def main(rounds: int, requests: int) -> None:
    os.environ["POOLWATCH_METRICS_PORT"] = "0"
    from fastapi import FastAPI
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy import create_engine, text

    import poolwatch
    from poolwatch.agent import agent

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)
    trace.set_tracer_provider(TracerProvider())

    def make_app() -> FastAPI:
        app = FastAPI()

        @app.get("/")
        async def trivial() -> dict:
            return {"ok": True}

        FastAPIInstrumentor.instrument_app(app)
        return app

    otel_only, with_poolwatch = make_app(), make_app()
    poolwatch.instrument(with_poolwatch)
    recording = agent.http_server  # poolwatch's HTTP series, before they step aside
    agent.start()
    assert agent.http_server is None, "poolwatch's http.server.* did not step aside"

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

    def http_stats(stats):
        def switch() -> None:
            agent.http_server = stats

        return switch

    variants = {
        "OpenTelemetry alone": (http_stats(None), timed(otel_only)),
        "+ poolwatch (steps aside)": (http_stats(None), timed(with_poolwatch)),
        "+ poolwatch, HTTP twice": (http_stats(recording), timed(with_poolwatch)),
    }
    for _, run in variants.values():
        await run()  # warm up
    medians = await interleave(variants, rounds)
    report("Time per request, trivial route (ratio of times)", medians, "OpenTelemetry alone")
    agent.http_server = None

    # three SQLite pools, each used once: the registry of a small service
    with tempfile.TemporaryDirectory() as directory:
        engines = [create_engine(f"sqlite:///{directory}/{n}.db") for n in range(3)]
        for engine in engines:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        await measure_collection(provider, reader, rounds)
        for engine in engines:
            engine.dispose()
    poolwatch.uninstrument()


async def measure_collection(provider, reader, rounds: int) -> None:
    from poolwatch.agent import agent
    from poolwatch.exporters import otlp

    joined = agent.joined

    def membership(on: bool):
        def switch() -> None:
            nonlocal joined
            if on and joined is None:
                joined = otlp.join(provider, agent.registry_collect)
            elif not on and joined is not None:
                joined.close()
                joined = None

        return switch

    async def collect() -> float:
        start = time.perf_counter()
        for _ in range(20):
            reader.get_metrics_data()
        return (time.perf_counter() - start) / 20

    series = sum(1 for _ in agent.registry.collect())
    medians = await interleave(
        {
            "app's metrics alone": (membership(False), collect),
            f"+ poolwatch's ({series} series)": (membership(True), collect),
        },
        rounds,
    )
    report(
        "One collection of the app's reader, off the request path", medians, "app's metrics alone"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests))
