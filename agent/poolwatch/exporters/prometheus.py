"""Prometheus exposition: a collector that reads the registry at scrape time, and a listener
served from its own thread so ``/metrics`` answers while the event loop is blocked."""

from __future__ import annotations

import hmac
import os
import selectors
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromFamily,
)
from prometheus_client.utils import floatToGoString

from .. import metrics
from ..metrics import BUCKETS, COUNTER, HISTOGRAM, HistogramValue, Metric, Point, prom_label

_LE = [*(floatToGoString(b) for b in BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
# What an agent's registry can hold: the contract less the sidecar's own (`poolwatch exporter`)
AGENT_METRICS = [
    m
    for m in vars(metrics).values()
    if isinstance(m, Metric)
    and m is not metrics.EXPORTER_WORKERS
    and not m.name.startswith("postgresql.")
]


def families(
    points: Iterable[Point], extra_labels: dict[str, str] | None = None
) -> list[PromFamily]:
    """Group points into prometheus_client metric families (one per metric)."""
    extra = extra_labels or {}
    out: dict[str, Any] = {}  # Counter/Gauge/HistogramMetricFamily: each has add_metric
    for metric, attributes, value in points:
        labels = {prom_label(k): v for k, v in attributes.items()} | extra
        family = out.get(metric.name)
        if family is None:
            kind = {COUNTER: CounterMetricFamily, HISTOGRAM: HistogramMetricFamily}.get(
                metric.kind, GaugeMetricFamily
            )
            family = out[metric.name] = kind(
                metric.prom_name, metric.description, labels=list(labels)
            )
        if isinstance(value, HistogramValue):
            cumulative, running = [], 0
            for le, count in zip(_LE, value.counts, strict=True):
                running += count
                cumulative.append((le, running))
            family.add_metric(list(labels.values()), cumulative, sum_value=value.total)
        else:
            family.add_metric(list(labels.values()), value)
    return list(out.values())


class PoolwatchCollector:
    """A prometheus_client collector; register it in your own registry if you serve one."""

    def __init__(
        self, collect: Callable[[], Iterable[Point]], labels: dict[str, str] | None = None
    ):
        self._collect = collect
        self._labels = labels

    def collect(self) -> Iterator[PromFamily]:
        yield from families(self._collect(), self._labels)

    def describe(self) -> Iterator[PromFamily]:
        """Every family poolwatch may show, without values: a registry that already has one of
        these names refuses poolwatch's collector at ``register()`` (a clash found at start-up,
        not as a duplicate family in a scrape that Prometheus would then reject)."""
        for metric in AGENT_METRICS:
            kind = {COUNTER: CounterMetricFamily, HISTOGRAM: HistogramMetricFamily}.get(
                metric.kind, GaugeMetricFamily
            )
            yield kind(metric.prom_name, metric.description, labels=[])


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


def metrics_app(
    registry: CollectorRegistry, token: str | None, health: Callable[[], bool] | None = None
) -> Any:
    """WSGI app: ``/metrics`` (optionally behind a bearer token) and ``/healthz``."""
    metrics = make_wsgi_app(registry)
    expected = f"Bearer {token}".encode() if token else None

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/health"):
            ok = health() if health else True
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"unhealthy\n"]
        if expected is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not hmac.compare_digest(given, expected):
                start_response(
                    "401 Unauthorized",
                    [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")],
                )
                return [b"unauthorized\n"]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"poolwatch: metrics are at /metrics\n"]
        exposition: Iterable[bytes] = metrics(environ, start_response)
        return exposition

    return app


class MetricsServer:
    """``/metrics`` on a daemon thread (independent of any event loop).

    ``stop()`` returns at once with the port free: the serving thread waits on the listening
    socket *and* a wake-up socket, so it need not poll (``socketserver.shutdown()`` waits up to
    its 0.5 s poll interval, on the event loop at every lifespan shutdown).
    """

    def __init__(self, app: Any, addr: str, port: int) -> None:
        server_class: type[_ThreadingWSGIServer] = _ThreadingWSGIServer
        if ":" in addr:
            server_class = type(  # a subclass, made here
                "_Server6", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6}
            )
        self._server = make_server(
            addr, port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self._server.timeout = 0  # handle_request() only runs once the socket is ready
        self.port = self._server.server_port
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        _servers.add(self)
        self._thread = threading.Thread(target=self._serve, name="poolwatch-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self._server.socket and not self._stopping:
                        self._server.handle_request()  # accept; a thread answers it

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)  # microseconds: it is woken, not polled
        self._close()

    def _close(self) -> None:
        _servers.discard(self)
        self._server.server_close()  # the port is free from here on
        self._wake_r.close()
        self._wake_w.close()


_servers: weakref.WeakSet[MetricsServer] = weakref.WeakSet()


def _close_in_child() -> None:
    # A child forked by the app (multiprocessing's fork) inherits the listening socket, which
    # would keep the port taken after this process is gone; the child has no serving thread.
    for server in list(_servers):
        server._stopping = True
        server._close()


os.register_at_fork(after_in_child=_close_in_child)
