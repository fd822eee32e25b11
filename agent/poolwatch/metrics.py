"""The metric contract: every series poolwatch exports, described once.

Each :class:`Metric` is described once, by its OpenTelemetry name, kind and unit; the Prometheus
name is derived with the OTel->Prometheus translation rules so both exporters agree by
construction. Probes record into plain Python state (``_histogram.Histogram`` on hot paths);
exporters read it at collect time as :class:`Point` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Must contain the alert thresholds (0.1 s and 1 s) so that alerts on histogram quantiles are exact.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

COUNTER, UPDOWN, GAUGE, HISTOGRAM = "counter", "updowncounter", "gauge", "histogram"


@dataclass(frozen=True)
class Metric:
    name: str  # OpenTelemetry instrument name
    kind: str  # COUNTER | UPDOWN | GAUGE | HISTOGRAM
    unit: str  # UCUM: "s", "{connection}", ...
    description: str

    @property
    def prom_name(self) -> str:
        """OTel -> Prometheus: dots become underscores, unit s adds _seconds (counters get _total
        from prometheus_client itself)."""
        base = self.name.replace(".", "_")
        if self.unit == "s" and not base.endswith("_seconds"):
            base += "_seconds"
        return base

    def sample(self, part: str = "") -> str:
        """A sample name of the exposition: counters end in ``_total``; a histogram's ``part``
        is ``bucket``, ``count`` or ``sum``. The commands and generators read names from here."""
        if self.kind == COUNTER:
            return f"{self.prom_name}_total"
        return f"{self.prom_name}_{part}" if part else self.prom_name


def prom_label(key: str) -> str:
    return key.replace(".", "_")


class HistogramValue(NamedTuple):
    counts: tuple[int, ...]  # per bucket (not cumulative), last one is +Inf
    total: float  # sum of observed values

    @property
    def count(self) -> int:  # type: ignore[override]  # shadows tuple.count: unused here
        return sum(self.counts)


class Point(NamedTuple):
    metric: Metric
    attributes: dict[str, str]
    value: float | HistogramValue


def _m(name: str, kind: str, unit: str, description: str) -> Metric:
    return Metric(name, kind, unit, description)


# --- database connection pools (OTel semconv, status "development") ---
DB_COUNT = _m(
    "db.client.connection.count",
    UPDOWN,
    "{connection}",
    "Connections currently in the state described by db.client.connection.state.",
)
DB_IDLE_MAX = _m(
    "db.client.connection.idle.max",
    UPDOWN,
    "{connection}",
    "Maximum number of idle connections allowed (SQLAlchemy pool_size).",
)
DB_IDLE_MIN = _m(
    "db.client.connection.idle.min",
    UPDOWN,
    "{connection}",
    "Minimum number of idle connections kept open.",
)
DB_MAX = _m(
    "db.client.connection.max",
    UPDOWN,
    "{connection}",
    "Maximum number of open connections allowed.",
)
DB_PENDING = _m(
    "db.client.connection.pending_requests",
    UPDOWN,
    "{request}",
    "Requests currently waiting for a connection from the pool.",
)
DB_TIMEOUTS = _m(
    "db.client.connection.timeouts",
    COUNTER,
    "{timeout}",
    "Checkouts that timed out waiting for a connection.",
)
DB_CREATE_TIME = _m(
    "db.client.connection.create_time",
    HISTOGRAM,
    "s",
    "Time it took to open a new database connection.",
)
DB_WAIT_TIME = _m(
    "db.client.connection.wait_time",
    HISTOGRAM,
    "s",
    "Time it took to obtain a connection from the pool, waiting included.",
)
DB_USE_TIME = _m(
    "db.client.connection.use_time",
    HISTOGRAM,
    "s",
    "Time between checkout and return of a connection.",
)
SA_OVERFLOW = _m(
    "sqlalchemy.pool.overflow",
    GAUGE,
    "{connection}",
    "SQLAlchemy overflow connections open beyond pool_size.",
)
SA_INVALIDATIONS = _m(
    "sqlalchemy.pool.invalidations",
    COUNTER,
    "{invalidation}",
    "Connections invalidated (soft=true: marked for recycle on next checkout).",
)
LEAKS = _m(
    "poolwatch.connection.leaks",
    COUNTER,
    "{leak}",
    "Connections held longer than POOLWATCH_LEAK_THRESHOLD.",
)

# High-water marks (no semconv): the peak of used and of pending over the last one to two
# windows of PEAK_WINDOW seconds. A window rotates on time, never on a read, so two readers
# (Prometheus and `poolwatch advise`) never take a peak from each other, and any reader that
# collects at least once per window sees every burst.
PEAK_WINDOW = 60.0
DB_USED_PEAK = _m(
    "poolwatch.db.client.connection.used.max",
    GAUGE,
    "{connection}",
    "Peak of used connections over the last 60 to 120 s (a burst between two collections).",
)
DB_PENDING_PEAK = _m(
    "poolwatch.db.client.connection.pending_requests.max",
    GAUGE,
    "{request}",
    "Peak of requests waiting for a connection over the last 60 to 120 s.",
)
DB_DEMAND_PEAK = _m(
    "poolwatch.db.client.connection.demand.max",
    GAUGE,
    "{request}",
    "Peak of used + pending at one moment over the last 60 to 120 s (what a burst asked for).",
)

# --- diagnosis: the guide's anti-patterns caught at runtime (probes/diagnosis.py) ---
ANTIPATTERN_KINDS = (
    "engine_per_request",
    "client_per_request",
    "sync_db_on_loop",
    "n_plus_one",
    "shared_async_session",
    "swallowed_cancel",
    "unclosed_pool",
)
ANTIPATTERNS = _m(
    "poolwatch.antipatterns",
    COUNTER,
    "{occurrence}",
    "Anti-patterns caught at runtime, by kind and culprit (the app's module:function).",
)
REQUEST_QUERIES = _m(
    "poolwatch.http.server.request.queries",
    HISTOGRAM,
    "{query}",
    "Database queries per HTTP request, by http.route.",
)

# --- the agent itself ---
BUILD_INFO = _m("poolwatch.build_info", GAUGE, "1", "poolwatch build information (always 1).")
AGENT_ERRORS = _m(
    "poolwatch.agent.errors",
    COUNTER,
    "{error}",
    "Exceptions caught inside poolwatch hooks (the app's call went on).",
)

# --- aiohttp client connection pools ---
HTTP_CLIENT_OPEN = _m(
    "http.client.open_connections",
    UPDOWN,
    "{connection}",
    "Open client connections by http.connection.state (active|idle).",
)
HTTP_CLIENT_DURATION = _m(
    "http.client.connection.duration", HISTOGRAM, "s", "Lifetime of closed client connections."
)
AIOHTTP_LIMIT = _m(
    "aiohttp.client.connection.limit",
    GAUGE,
    "{connection}",
    "TCPConnector limit (scope=total) and limit_per_host (scope=per_host).",
)
AIOHTTP_PENDING = _m(
    "aiohttp.client.pending_requests",
    UPDOWN,
    "{request}",
    "Requests queued for a connection by the connector's limits.",
)
AIOHTTP_WAIT_TIME = _m(
    "aiohttp.client.connection.wait_time",
    HISTOGRAM,
    "s",
    "Time requests spent queued for a connection.",
)
AIOHTTP_ERRORS = _m(
    "aiohttp.client.errors",
    COUNTER,
    "{error}",
    "Requests that raised (e.g. a refused connection), by server and error.type.",
)

# --- httpx client connection pools (httpcore's); the open connections and their lifetimes are
# the http.client.* set above, labelled httpx.client.name ---
HTTPX_LIMIT = _m(
    "httpx.client.connection.limit",
    GAUGE,
    "{connection}",
    "httpx Limits: max_connections (scope=total) and max_keepalive_connections (scope=keepalive).",
)
HTTPX_PENDING = _m(
    "httpx.client.pending_requests",
    UPDOWN,
    "{request}",
    "Requests queued for a connection by the pool's limits.",
)
HTTPX_WAIT_TIME = _m(
    "httpx.client.connection.wait_time",
    HISTOGRAM,
    "s",
    "Time requests waited for a connection (0 when one was free), per request answered.",
)
HTTPX_ERRORS = _m(
    "httpx.client.errors",
    COUNTER,
    "{error}",
    "Requests that raised in the connection pool (PoolTimeout, ConnectError...), by server "
    "and error.type.",
)

# --- HTTP server ---
# semconv: known http.request.method values are kept, any other is "_OTHER" (a scanner's method
# is no label)
HTTP_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
HTTP_OTHER_METHOD = "_OTHER"
HTTP_SERVER_DURATION = _m(
    "http.server.request.duration", HISTOGRAM, "s", "Duration of HTTP server requests."
)
HTTP_SERVER_ACTIVE = _m(
    "http.server.active_requests", UPDOWN, "{request}", "HTTP server requests in flight."
)

# --- asyncio event loop ---
LOOP_LAG = _m(
    "asyncio.event_loop.lag",
    HISTOGRAM,
    "s",
    "How late the loop ran a timer callback (event-loop lag).",
)
LOOP_BLOCKS = _m(
    "asyncio.event_loop.blocks",
    COUNTER,
    "{block}",
    "Times the loop was blocked longer than POOLWATCH_BLOCK_THRESHOLD, by culprit.",
)
LOOP_BLOCKED = _m("asyncio.event_loop.blocked", COUNTER, "s", "Total seconds the loop was blocked.")
LOOP_TASKS = _m("asyncio.tasks", UPDOWN, "{task}", "Pending tasks of the event loop.")

# --- `poolwatch exporter`, the sidecar of several workers ---
EXPORTER_WORKERS = _m(
    "poolwatch.exporter.workers",
    GAUGE,
    "{worker}",
    "Live workers whose metrics this target serves (a pre-fork server's workers, or the files "
    "in POOLWATCH_MULTIPROC_DIR).",
)

# --- PostgreSQL server view (`poolwatch exporter --postgres-dsn`); no semconv exists: the names
# follow the OpenTelemetry Collector's postgresql receiver where it has one (connection.max) ---
PG_UP = _m(
    "postgresql.up",
    GAUGE,
    "1",
    "1 when the exporter's last query of the database server succeeded, else 0.",
)
PG_CONNECTION_MAX = _m(
    "postgresql.connection.max", GAUGE, "{connection}", "The server's max_connections setting."
)
PG_CONNECTION_RESERVED = _m(
    "postgresql.connection.reserved",
    GAUGE,
    "{connection}",
    "Connection slots ordinary roles cannot use: superuser_reserved_connections "
    "+ reserved_connections (PostgreSQL 16+).",
)
PG_CONNECTION_COUNT = _m(
    "postgresql.connection.count",
    GAUGE,
    "{connection}",
    "Client backends by database, state and application_name (pg_stat_activity).",
)
PG_IDLE_IN_TRANSACTION = _m(
    "postgresql.idle_in_transaction.max_age",
    GAUGE,
    "s",
    "Longest time a session has been idle in transaction, by database and application_name.",
)
