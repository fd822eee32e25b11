"""OTLP/HTTP export of every poolwatch metric through the OpenTelemetry SDK.

The SDK never runs on a hot path. A ``MeterProvider`` owns the resource (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``) and a ``PeriodicExportingMetricReader`` thread
(``OTEL_METRIC_EXPORT_INTERVAL``) driving the SDK's ``OTLPMetricExporter``
(``OTEL_EXPORTER_OTLP_*``).
At each export, :class:`RegistryReader` reads the registry once — the same snapshot a ``/metrics``
scrape serves — and turns every point into the SDK's export model:

    Counter        -> monotonic cumulative Sum
    UpDownCounter  -> non-monotonic cumulative Sum
    Gauge          -> Gauge
    Histogram      -> cumulative explicit-bucket Histogram, bounds = metrics.BUCKETS

Why not SDK instruments fed from the registry: the API has no observable histogram, so
pool waits and request durations would need ``Histogram.record`` on the hot path (~6 µs each
here) or a replay of every value; observable counters/gauges would read the registry once per
instrument instead of once per export, and every new metric of a probe would need an instrument
registered. Building the points from the registry keeps one code path for every kind, the same
buckets as Prometheus, and the same values.

Failures (collector down, slow, refusing) cost the app nothing: export runs on the reader's
thread, one at a time (nothing queues), each bounded by ``OTEL_EXPORTER_OTLP_TIMEOUT`` (default
10 s), and each failed export is counted in ``poolwatch_agent_errors_total{probe="otlp"}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from .. import __version__
from ..log import errors
from ..metrics import BUCKETS, BUILD_INFO, COUNTER, GAUGE, HISTOGRAM, HistogramValue, Point
from ..otel_env import export_timeout

PROBE = "otlp"
SCOPE = "poolwatch"
CUMULATIVE = AggregationTemporality.CUMULATIVE
# semconv types these attributes as integers; the registry holds label text for Prometheus.
INT_ATTRIBUTES = frozenset(("http.response.status_code", "server.port"))


class ExportFailed(Exception):
    """An OTLP export did not succeed (the SDK logged why); counted, never raised into the app."""


class CountingExporter(OTLPMetricExporter):
    def export(self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kw: Any):
        try:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kw)
        except Exception as exc:  # the reader would log and drop it: count it as well
            errors.record(PROBE, exc)
            return MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            errors.record(PROBE, ExportFailed("OTLP metrics export failed"))
        return result


def _attributes(attributes: dict[str, str]) -> dict[str, str | int]:
    return {k: int(v) if k in INT_ATTRIBUTES and v.isdigit() else v for k, v in attributes.items()}


def to_metrics(points: Iterable[Point], start_of: Callable[[Point], int], now: int) -> list[Metric]:
    """Registry points -> SDK ``Metric``s (one per instrument, in the registry's order)."""
    grouped: dict[str, tuple[Any, list[Any]]] = {}
    for point in points:
        metric, value = point.metric, point.value
        attributes, start = _attributes(point.attributes), start_of(point)
        if isinstance(value, HistogramValue):
            data_point: Any = HistogramDataPoint(
                attributes=attributes,
                start_time_unix_nano=start,
                time_unix_nano=now,
                count=value.count,
                sum=value.total,
                bucket_counts=list(value.counts),
                explicit_bounds=list(BUCKETS),
                min=None,  # not tracked: the hot path only appends values
                max=None,
            )
        else:
            data_point = NumberDataPoint(attributes, start, now, value)
        grouped.setdefault(metric.name, (metric, []))[1].append(data_point)
    out = []
    for metric, data_points in grouped.values():
        if metric.kind == HISTOGRAM:
            data: Any = Histogram(data_points, CUMULATIVE)
        elif metric.kind == GAUGE:
            data = Gauge(data_points)
        else:  # COUNTER or UPDOWN
            data = Sum(data_points, CUMULATIVE, is_monotonic=metric.kind == COUNTER)
        out.append(Metric(metric.name, metric.description, metric.unit, data))
    return out


class RegistryReader(PeriodicExportingMetricReader):
    """Adds the registry's metrics to each export of the SDK (see the module docstring)."""

    def __init__(self, collect: Callable[[], Iterable[Point]], exporter: OTLPMetricExporter):
        super().__init__(exporter)
        self._read = collect
        self._starts: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}

    def _start_of(self, now: int) -> Callable[[Point], int]:
        """Cumulative points start when poolwatch first saw their series; a series that vanished
        (a closed pool) and comes back restarts from zero with a new start time."""
        seen, starts = {}, self._starts

        def start_of(point: Point) -> int:
            key = (point.metric.name, frozenset(point.attributes.items()))
            seen[key] = starts.get(key, now)
            return seen[key]

        self._starts = seen
        return start_of

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kw):
        try:
            now = time.time_ns()
            points = (p for p in self._read() if p.metric is not BUILD_INFO)  # the SDK sends it
            ours = to_metrics(points, self._start_of(now), now)
            resource_metrics = [
                ResourceMetrics(
                    rm.resource,
                    [
                        ScopeMetrics(sm.scope, [*sm.metrics, *ours], sm.schema_url)
                        if sm.scope.name == SCOPE
                        else sm
                        for sm in rm.scope_metrics
                    ],
                    rm.schema_url,
                )
                for rm in metrics_data.resource_metrics
            ]
            metrics_data = MetricsData(resource_metrics)
        except Exception as exc:  # still send what the SDK has (build_info); counted here
            errors.record(PROBE, exc)
        super()._receive_metrics(metrics_data, timeout_millis, **kw)


def resource() -> Resource:
    """``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` via the SDK's detectors, which also give
    each process (each worker, also after a fork) its own ``service.instance.id``: workers of one
    service do not overwrite each other's series at the collector."""
    return Resource.create()


def start(collect: Callable[[], Iterable[Point]]) -> Callable[[], None]:
    """Start exporting; returns the stop function (sends a last export without blocking)."""
    reader = RegistryReader(collect, CountingExporter())
    provider = MeterProvider(metric_readers=[reader], resource=resource(), shutdown_on_exit=False)
    # build_info as the one SDK instrument: the SDK passes an export to the reader only when
    # its own instruments produced data, and this one always has (and carries the resource).
    meter = provider.get_meter(SCOPE, __version__)

    def build_info(options: CallbackOptions) -> list[Observation]:
        return [Observation(1, {"version": __version__})]

    meter.create_observable_gauge(
        BUILD_INFO.name, [build_info], unit=BUILD_INFO.unit, description=BUILD_INFO.description
    )
    timeout_ms = (export_timeout() + 1) * 1000

    def stop() -> None:
        # The last export may wait on a slow collector: never on the caller (the event loop at
        # lifespan shutdown). A non-daemon thread lets it finish, bounded, before the process
        # exits.
        threading.Thread(
            target=provider.shutdown,
            kwargs={"timeout_millis": timeout_ms},
            name="poolwatch-otlp-shutdown",
        ).start()

    return stop
