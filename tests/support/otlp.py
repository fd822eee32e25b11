"""A real OTLP/HTTP receiver on loopback: aiohttp, bodies decoded with ``opentelemetry-proto``.

Runs on the test's event loop. ``delay`` makes it answer late (a slow collector).
"""

from __future__ import annotations

import asyncio
import gzip
import time

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .net import free_port


def _body(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw  # aiohttp may have inflated it


class OtlpReceiver:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.port = free_port()
        self.metrics: list[tuple[float, ExportMetricsServiceRequest]] = []  # (received at, body)
        self.traces: list[ExportTraceServiceRequest] = []
        self.posts = 0  # requests that arrived, answered or not
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = ExportMetricsServiceRequest()
        body.ParseFromString(_body(await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        self.metrics.append((time.monotonic(), body))
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def _traces(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = ExportTraceServiceRequest()
        body.ParseFromString(_body(await request.read()))
        self.traces.append(body)
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def export_after(
        self, moment: float, timeout: float = 20.0
    ) -> ExportMetricsServiceRequest:
        """The first metrics export received after ``moment`` (``time.monotonic()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for received, body in self.metrics:
                if received > moment:
                    return body
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no OTLP metrics export after {timeout}s ({len(self.metrics)} before)")


def instruments(request: ExportMetricsServiceRequest) -> dict:
    """name -> (scope name, Metric proto) of every instrument in one export."""
    found = {}
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                assert metric.name not in found, f"{metric.name} exported twice"
                found[metric.name] = (scope_metrics.scope.name, metric)
    return found


def attributes(key_values) -> dict:
    """OTLP KeyValue list -> {key: python value} (int stays int, string stays str)."""
    out = {}
    for kv in key_values:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out
