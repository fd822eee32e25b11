"""OTLP export of every poolwatch metric through the OpenTelemetry SDK.

One ``MeterProvider`` per process: the app's when it has set one (the ``opentelemetry-instrument``
distro does, or the app's own code before its lifespan start-up ends), else one of poolwatch's
own. Either way poolwatch's metrics go out in the provider's own export requests, with its
resource, in the instrumentation scope ``poolwatch``.

The SDK never runs on a hot path. The SDK has no observable histogram, and ``Histogram.record``
costs ~6 µs here (pool waits and request durations would pay it per event); observable
counters would read the registry once per instrument. Instead, at each collection of a reader
of the provider, :class:`Points` reads the registry once — the same snapshot a ``/metrics``
scrape serves — and turns every point into the SDK's export model:

    Counter        -> monotonic Sum
    UpDownCounter  -> non-monotonic Sum
    Gauge          -> Gauge
    Histogram      -> explicit-bucket Histogram, bounds = metrics.BUCKETS

cumulative, or delta where the reader prefers delta for that kind of instrument
(``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``).

How the points get in: ``MetricReader._receive_metrics`` (the method readers override to get a
collection) is wrapped on each reader *instance* of the provider; the wrapper puts poolwatch's
points into the ``poolwatch`` scope and calls the reader's own method. That scope exists in
every collection because poolwatch registers one SDK instrument there, ``poolwatch.build_info``
(the SDK hands a reader nothing when no instrument has data). The provider's readers are found
through SDK internals, gated below (:func:`readers`): an unknown shape raises
:class:`UnknownShape` and the caller degrades. OpenTelemetry's own Prometheus exporter
(``PrometheusMetricReader``) gets no points: poolwatch's collector goes into that reader's
``prometheus_client`` registry instead, with the contract's names (see :class:`Joined`).

Failures (collector down, slow, refusing) cost the app nothing: export runs on the reader's
thread, one at a time, bounded by ``OTEL_EXPORTER_OTLP_TIMEOUT``; each failed export is counted in
``poolwatch_agent_errors_total{probe="otlp"}``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk import version as sdk_version
from opentelemetry.sdk.metrics import Counter, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from .._log import errors
from .._types import Undo
from .._version import __version__
from ..metrics import (
    BUCKETS,
    BUILD_INFO,
    COUNTER,
    GAUGE,
    HISTOGRAM,
    UPDOWN,
    HistogramValue,
    Point,
)
from ._otel_env import export_timeout, protocol

PROBE = "otlp"
SCOPE = "poolwatch"
CUMULATIVE, DELTA = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
# semconv types these attributes as integers; the registry holds label text for Prometheus.
INT_ATTRIBUTES = frozenset(("http.response.status_code", "server.port"))
# SDK versions whose private reader/provider attributes (see readers()) were checked
KNOWN_SDK = ((1, 25), (2, 0))


class ExportFailed(Exception):
    """An OTLP export did not succeed (the SDK logged why); counted, never raised into the app."""


class UnknownShape(Exception):
    """The SDK's internals are not the ones poolwatch knows: it cannot join that provider."""


def _attributes(attributes: dict[str, str]) -> dict[str, str | int]:
    return {k: int(v) if k in INT_ATTRIBUTES and v.isdigit() else v for k, v in attributes.items()}


def _minus(value: Any, before: Any) -> Any:
    """``value - before`` for a counter or a histogram; None if it went down (a reset)."""
    if isinstance(value, HistogramValue):
        counts = [a - b for a, b in zip(value.counts, before.counts, strict=True)]
        if min(counts) < 0:
            return None
        return HistogramValue(tuple(counts), value.total - before.total)
    return value - before


class Points:
    """Registry points -> SDK ``Metric``s for one reader, in the temporality it prefers."""

    def __init__(self, temporality: dict[str, AggregationTemporality] | None = None) -> None:
        self.temporality = temporality or {}
        self._starts: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
        self._last: dict[tuple[str, frozenset[tuple[str, str]]], Any] = {}  # delta: last value
        self._last_time = 0

    def metrics(self, points: Iterable[Point], now: int) -> list[Metric]:
        """Cumulative points start when poolwatch first saw their series; a series that vanished
        (a closed pool) and comes back restarts from zero with a new start time. Delta points
        cover the time since this reader's previous collection."""
        grouped: dict[str, tuple[Any, list[Any]]] = {}
        starts, last, previous = {}, {}, self._last_time
        for point in points:
            metric, value = point.metric, point.value
            key = (metric.name, frozenset(point.attributes.items()))
            start = starts[key] = self._starts.get(key, now)
            temporality = self.temporality.get(metric.kind, CUMULATIVE)
            if temporality is DELTA:  # the change since this reader's previous collection
                last[key] = value
                before = self._last.get(key)
                if before is not None and (difference := _minus(value, before)) is not None:
                    value = difference
                start = previous or start
            attributes = _attributes(point.attributes)
            if isinstance(value, HistogramValue):
                data_point: Any = HistogramDataPoint(
                    attributes=attributes,
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=value.count,
                    sum=value.total,
                    bucket_counts=list(value.counts),
                    explicit_bounds=list(BUCKETS),
                    min=None,  # type: ignore[arg-type]  # not tracked: the hot path only appends
                    max=None,  # type: ignore[arg-type]  # (the SDK's own exporters accept None)
                )
            else:
                data_point = NumberDataPoint(attributes, start, now, value)
            grouped.setdefault(metric.name, (metric, []))[1].append(data_point)
        self._starts, self._last, self._last_time = starts, last, now
        out = []
        for metric, data_points in grouped.values():
            temporality = self.temporality.get(metric.kind, CUMULATIVE)
            if metric.kind == HISTOGRAM:
                data: Any = Histogram(data_points, temporality)
            elif metric.kind == GAUGE:
                data = Gauge(data_points)
            else:  # COUNTER or UPDOWN
                data = Sum(data_points, temporality, is_monotonic=metric.kind == COUNTER)
            out.append(Metric(metric.name, metric.description, metric.unit, data))
        return out


# --- the provider's internals (gated) -------------------------------------------------------
def _sdk_known() -> bool:
    try:
        found = tuple(int(part) for part in sdk_version.__version__.split(".")[:2])
    except ValueError:
        return False
    return KNOWN_SDK[0] <= found < KNOWN_SDK[1]


def readers(provider: MeterProvider) -> list[MetricReader]:
    """Every reader of ``provider`` (given to its constructor or added later). Private SDK
    attributes: ``_measurement_consumer._reader_storages`` (keys: the readers), each reader's
    ``_receive_metrics`` and ``_instrument_class_temporality``."""
    storages = getattr(getattr(provider, "_measurement_consumer", None), "_reader_storages", None)
    if not _sdk_known() or not isinstance(storages, dict):
        raise UnknownShape(f"opentelemetry-sdk {sdk_version.__version__}")
    found = list(storages)
    for reader in found:
        if not isinstance(reader, MetricReader) or not isinstance(
            getattr(reader, "_instrument_class_temporality", None), dict
        ):
            raise UnknownShape(f"opentelemetry-sdk {sdk_version.__version__}, {reader!r}")
    return found


def temporality(reader: MetricReader) -> dict[str, AggregationTemporality]:
    """The temporality ``reader`` asks for, per poolwatch kind (its synchronous instruments')."""
    table = reader._instrument_class_temporality
    out = {}
    for kind, public in (
        (COUNTER, Counter),
        (UPDOWN, UpDownCounter),
        (HISTOGRAM, HistogramInstrument),
    ):
        out[kind] = next((t for cls, t in table.items() if issubclass(cls, public)), CUMULATIVE)
    return out


def prometheus_registry(reader: MetricReader) -> Any:
    """The ``prometheus_client`` registry OpenTelemetry's Prometheus exporter serves, if
    ``reader`` is that exporter; else None."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        return None
    if not isinstance(reader, PrometheusMetricReader):
        return None
    registry = getattr(reader, "_registry", None)
    if registry is None:  # older versions always register in the default registry
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return registry


# --- joining a provider -----------------------------------------------------------------------
def _replace_scope(metrics_data: MetricsData, ours: list[Metric] | None) -> MetricsData:
    """``metrics_data`` with the ``poolwatch`` scope holding ``ours`` as well (None: without
    that scope at all)."""
    resource_metrics = []
    for rm in metrics_data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            if sm.scope.name != SCOPE:
                scopes.append(sm)
            elif ours is not None:
                scopes.append(ScopeMetrics(sm.scope, [*sm.metrics, *ours], sm.schema_url))
        resource_metrics.append(ResourceMetrics(rm.resource, scopes, rm.schema_url))
    return MetricsData(resource_metrics)


class Joined:
    """poolwatch's metrics in every collection of one provider's readers; ``close()`` undoes
    every wrapper. ``prometheus_registries``: where OpenTelemetry's Prometheus exporters on
    that provider serve from (poolwatch's own collector belongs there)."""

    def __init__(self, provider: MeterProvider, collect: Callable[[], Iterable[Point]]) -> None:
        found = readers(provider)  # UnknownShape before anything is changed
        self._collect = collect
        self._undos: list[Undo] = []
        self.readers = len(found)
        self.prometheus_registries = []
        # An observable instrument cannot be removed from a provider: it is made once per
        # provider, and observes nothing while no Joined of that provider is open.
        opened = _opened.get(provider)
        if opened is None:
            opened = _opened[provider] = []

            def build_info(options: CallbackOptions) -> list[Observation]:
                return [Observation(1, {"version": __version__})] if opened else []

            provider.get_meter(SCOPE, __version__).create_observable_gauge(
                BUILD_INFO.name,
                [build_info],
                unit=BUILD_INFO.unit,
                description=BUILD_INFO.description,
            )
        opened.append(self)
        self._undos.append(lambda: opened.remove(self))
        try:
            for reader in found:
                registry = prometheus_registry(reader)
                if registry is not None:
                    self.prometheus_registries.append(registry)
                    self._wrap(reader, None)
                else:
                    self._wrap(reader, Points(temporality(reader)))
                    self._count_failures(reader)
        except (AttributeError, TypeError) as exc:  # e.g. a reader with __slots__
            self.close()
            raise UnknownShape(f"{type(exc).__name__}: {exc}") from None

    def _wrap(self, reader: MetricReader, points: Points | None) -> None:
        original = reader._receive_metrics
        lock = threading.Lock()  # a force_flush() may collect beside the reader's own thread

        def receive_metrics(
            metrics_data: MetricsData, timeout_millis: float = 10_000, **kw: Any
        ) -> Any:
            try:
                ours = None
                if points is not None:
                    # build_info comes from the SDK instrument (it carries the scope)
                    with lock:
                        ours = points.metrics(
                            (p for p in self._collect() if p.metric is not BUILD_INFO),
                            time.time_ns(),
                        )
                metrics_data = _replace_scope(metrics_data, ours)
            except Exception as exc:  # the reader still gets the app's own metrics
                errors.record(PROBE, exc)
            return original(metrics_data, timeout_millis, **kw)

        reader._receive_metrics = receive_metrics  # type: ignore[method-assign]
        self._undos.append(lambda: _unset(reader, "_receive_metrics", receive_metrics))

    def _count_failures(self, reader: MetricReader) -> None:
        """Count each failed export of a push reader (``PeriodicExportingMetricReader``)."""
        exporter = getattr(reader, "_exporter", None)
        if exporter is None or not callable(getattr(exporter, "export", None)):
            return
        original = exporter.export

        def export(metrics_data: MetricsData, timeout_millis: float = 10_000, **kw: Any) -> Any:
            try:
                result = original(metrics_data, timeout_millis=timeout_millis, **kw)
            except Exception as exc:
                errors.record(PROBE, exc)
                raise  # the reader handles it as it did without poolwatch
            if result is not MetricExportResult.SUCCESS:
                errors.record(PROBE, ExportFailed("OTLP metrics export failed"))
            return result

        exporter.export = export
        self._undos.append(lambda: _unset(exporter, "export", export))

    def close(self) -> None:
        undos, self._undos = self._undos, []
        for undo in reversed(undos):
            undo()


_opened: weakref.WeakKeyDictionary[MeterProvider, list[Joined]] = weakref.WeakKeyDictionary()


def _unset(obj: Any, name: str, wrapper: Any) -> None:
    """Remove our instance-level ``wrapper`` (the class's method shows through again)."""
    if obj.__dict__.get(name) is wrapper:
        delattr(obj, name)


def join(provider: MeterProvider, collect: Callable[[], Iterable[Point]]) -> Joined:
    return Joined(provider, collect)


# --- poolwatch's own provider -----------------------------------------------------------------
def resource() -> Resource:
    """``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` via the SDK's detectors, which also give
    each process (each worker, also after a fork) its own ``service.instance.id``: workers of one
    service do not overwrite each other's series at the collector."""
    return Resource.create()


def exporter() -> Any:
    """The SDK's OTLP metric exporter for ``OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL`` (ImportError
    when its package is missing)."""
    if protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter()


def start(collect: Callable[[], Iterable[Point]]) -> Callable[[], None]:
    """Export through a provider of poolwatch's own; returns the stop function (sends a last
    export without blocking)."""
    reader = PeriodicExportingMetricReader(exporter())
    provider = MeterProvider(metric_readers=[reader], resource=resource(), shutdown_on_exit=False)
    Joined(provider, collect)
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
