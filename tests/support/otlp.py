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


class GrpcReceiver:
    """A real OTLP/gRPC receiver on loopback (what the ``opentelemetry-instrument`` distro sends
    by default): ``grpcio`` serving the collector's metrics, trace and logs services on its own
    threads. Use as a context manager; ``stop()`` makes it a collector that is down."""

    def __init__(self) -> None:
        self.port = free_port()
        self.metrics: list[tuple[float, ExportMetricsServiceRequest]] = []  # (received at, body)
        self.traces: list[ExportTraceServiceRequest] = []
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> GrpcReceiver:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                receiver.metrics.append((time.monotonic(), request))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):
                return logs_service_pb2.ExportLogsServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def export_after(self, moment: float, timeout: float = 20.0) -> ExportMetricsServiceRequest:
        """The first metrics export received after ``moment`` (``time.monotonic()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for received, body in list(self.metrics):
                if received > moment:
                    return body
            time.sleep(0.05)
        raise TimeoutError(f"no OTLP metrics export after {timeout}s ({len(self.metrics)} before)")

    def spans(self) -> list:
        return [
            span
            for request in list(self.traces)
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
