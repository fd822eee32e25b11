"""Reading a poolwatch ``/metrics`` endpoint: fetch, parse into per-pool, per-host and per-loop
rows, and the histogram arithmetic (deltas between scrapes, quantiles) of ``top``, ``advise`` and
``demo``. Sample names come from the metric contract (``poolwatch/metrics.py``).
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .. import metrics as m
from ._common import UsageError

POOL = m.prom_label("db.client.connection.pool.name")
STATE = m.prom_label("db.client.connection.state")
WORKER = "worker"  # set on every series by the multi-worker sidecar

Buckets = dict[float, float]  # le -> cumulative count, +Inf included


@dataclass
class PoolRow:
    name: str  # the row's key: the pool name, with " [worker]" when several workers share it
    used: float = 0
    idle: float = 0
    max: float | None = None
    pending: float = 0
    timeouts: float = 0
    wait_count: float = 0
    wait_sum: float = 0
    pool: str = ""  # the pool name label itself
    worker: str | None = None
    idle_max: float | None = None  # SQLAlchemy pool_size; asyncpg max_size
    idle_min: float | None = None  # asyncpg and psycopg_pool min_size (redis has none)
    overflow: float | None = None  # SQLAlchemy only
    leaks: float = 0
    wait_buckets: Buckets = field(default_factory=dict)
    use_buckets: Buckets = field(default_factory=dict)
    use_count: float = 0
    use_sum: float = 0
    peak_used: float | None = None  # high-water marks of the last 60-120 s (None: older agent)
    peak_pending: float | None = None
    peak_demand: float | None = None  # used + pending at one moment


@dataclass
class HostRow:
    """An upstream (``server_address:server_port``) of one process: of its aiohttp sessions,
    or of one httpx client (``client``, its ``httpx_client_name``)."""

    name: str
    worker: str | None = None
    client: str | None = None  # the httpx client; None: aiohttp
    active: float = 0
    idle: float = 0
    limit: float | None = None  # limit_per_host, else the connector's limit; None: unlimited
    pending: float = 0
    wait_buckets: Buckets = field(default_factory=dict)


@dataclass
class LoopRow:
    """The event loop of one process (``name`` is its worker, or "")."""

    name: str
    lag_buckets: Buckets = field(default_factory=dict)
    lag_count: float = 0
    lag_sum: float = 0
    blocks: dict[str, float] = field(default_factory=dict)  # culprit -> count
    blocked_seconds: float = 0
    tasks: float = 0


@dataclass
class Snapshot:
    pools: dict[str, PoolRow] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)  # unlabelled totals by sample name
    hosts: dict[str, HostRow] = field(default_factory=dict)
    loops: dict[str, LoopRow] = field(default_factory=dict)
    antipatterns: dict[str, float] = field(default_factory=dict)  # kind -> count, all workers
    queries: dict[str, tuple[float, float]] = field(default_factory=dict)  # route -> (count, sum)

    @property
    def is_poolwatch(self) -> bool:
        """An agent's /metrics, or `poolwatch exporter`'s (which may have no worker yet)."""
        return m.BUILD_INFO.sample() in self.other or m.EXPORTER_WORKERS.sample() in self.other


# sample name -> PoolRow attribute, for the plain (non-bucket) pool series
_POOL_FIELDS = {
    m.DB_MAX.sample(): "max",
    m.DB_IDLE_MAX.sample(): "idle_max",
    m.DB_IDLE_MIN.sample(): "idle_min",
    m.DB_PENDING.sample(): "pending",
    m.DB_TIMEOUTS.sample(): "timeouts",
    m.DB_WAIT_TIME.sample("count"): "wait_count",
    m.DB_WAIT_TIME.sample("sum"): "wait_sum",
    m.DB_USE_TIME.sample("count"): "use_count",
    m.DB_USE_TIME.sample("sum"): "use_sum",
    m.SA_OVERFLOW.sample(): "overflow",
    m.LEAKS.sample(): "leaks",
    m.DB_USED_PEAK.sample(): "peak_used",
    m.DB_PENDING_PEAK.sample(): "peak_pending",
    m.DB_DEMAND_PEAK.sample(): "peak_demand",
}
_ROUTE = m.prom_label("http.route")
# the families of HTTP client and event-loop series (http.client.*, aiohttp.*, asyncio.*)
_HOST_PREFIXES = ("http_client_", "aiohttp_client_", "httpx_client_")
HTTPX_CLIENT = m.prom_label("httpx.client.name")
_LOOP_PREFIXES = ("asyncio_event_loop_", "asyncio_tasks")
_HOST = ("server_address", "server_port")


def _le(labels: dict[str, str]) -> float:
    return float(labels["le"])  # "+Inf" parses as inf


def parse(text: str) -> Snapshot:
    """Parse exposition text (raises ValueError when it is not exposition text)."""
    snap = Snapshot()
    totals: dict[str, float] = defaultdict(float)
    # worker -> scope -> connector limits not labelled by host (0 means unlimited in aiohttp)
    limits: dict[str | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    httpx_limits: dict[tuple[str | None, str], float] = {}  # (worker, client) -> max_connections
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            totals[name] += value
            worker = labels.get(WORKER)
            if (pool_name := labels.get(POOL)) is not None:
                _pool_sample(snap, pool_name, worker, name, labels, value)
            elif name.startswith(_HOST_PREFIXES):
                if all(k in labels for k in _HOST):
                    _host_sample(snap, labels, worker, name, value)
                elif name == m.AIOHTTP_LIMIT.sample():
                    limits[worker][labels.get("scope", "total")] += value
                elif name == m.HTTPX_LIMIT.sample() and labels.get("scope") == "total":
                    httpx_limits[(worker, labels.get(HTTPX_CLIENT, ""))] = value
            elif name.startswith(_LOOP_PREFIXES):
                _loop_sample(snap, worker or "", name, labels, value)
            elif name == m.ANTIPATTERNS.sample():
                kind = labels.get("kind", "?")
                snap.antipatterns[kind] = snap.antipatterns.get(kind, 0) + value
            elif name in _QUERIES and (route := labels.get(_ROUTE)) is not None:
                count, total = snap.queries.get(route, (0.0, 0.0))
                is_count = name == m.REQUEST_QUERIES.sample("count")
                snap.queries[route] = (count + value, total) if is_count else (count, total + value)
    for host in snap.hosts.values():
        if host.client is not None:
            host.limit = httpx_limits.get((host.worker, host.client)) or None
            continue
        scopes = limits.get(host.worker, {})
        if host.limit is None:
            host.limit = scopes.get("per_host") or scopes.get("total") or None
    snap.other = dict(totals)
    return snap


_QUERIES = (m.REQUEST_QUERIES.sample("count"), m.REQUEST_QUERIES.sample("sum"))


def _key(name: str, worker: str | None) -> str:
    return f"{name} [{worker}]" if worker else name


def _pool_sample(
    snap: Snapshot, pool: str, worker: str | None, name: str, labels: dict, value: float
) -> None:
    key = _key(pool, worker)
    row = snap.pools.get(key)
    if row is None:
        row = snap.pools[key] = PoolRow(key, pool=pool, worker=worker)
    if name == m.DB_COUNT.sample():
        setattr(row, "idle" if labels.get(STATE) == "idle" else "used", value)
    elif (attribute := _POOL_FIELDS.get(name)) is not None:
        setattr(row, attribute, value)
    elif name == m.DB_WAIT_TIME.sample("bucket"):
        row.wait_buckets[_le(labels)] = value
    elif name == m.DB_USE_TIME.sample("bucket"):
        row.use_buckets[_le(labels)] = value


def _host_sample(snap: Snapshot, labels: dict, worker: str | None, name: str, value: float):
    client = labels.get(HTTPX_CLIENT)
    host = f"{labels['server_address']}:{labels['server_port']}"
    key = _key(host if client is None else f"{host} (httpx {client})", worker)
    row = snap.hosts.setdefault(key, HostRow(key, worker, client))
    if name == m.HTTP_CLIENT_OPEN.sample():
        state = labels.get("http_connection_state")
        if state in ("active", "idle"):
            setattr(row, state, getattr(row, state) + value)  # summed over url_scheme
    elif name == m.AIOHTTP_LIMIT.sample():
        row.limit = value or None
    elif name == m.AIOHTTP_PENDING.sample():
        row.pending = value
    elif name == m.AIOHTTP_WAIT_TIME.sample("bucket"):
        row.wait_buckets[_le(labels)] = value
    elif name == m.HTTPX_PENDING.sample():
        row.pending = value
    elif name == m.HTTPX_WAIT_TIME.sample("bucket"):
        row.wait_buckets[_le(labels)] = value


def _loop_sample(snap: Snapshot, worker: str, name: str, labels: dict, value: float) -> None:
    row = snap.loops.setdefault(worker, LoopRow(worker))
    if name == m.LOOP_LAG.sample("bucket"):
        row.lag_buckets[_le(labels)] = value
    elif name == m.LOOP_LAG.sample("count"):
        row.lag_count = value
    elif name == m.LOOP_LAG.sample("sum"):
        row.lag_sum = value
    elif name == m.LOOP_BLOCKS.sample():
        culprit = labels.get("culprit", "?")
        row.blocks[culprit] = row.blocks.get(culprit, 0) + value
    elif name == m.LOOP_BLOCKED.sample():
        row.blocked_seconds = value
    elif name == m.LOOP_TASKS.sample():
        row.tasks = value


def delta(now: Buckets, before: Buckets | None) -> Buckets:
    """Observations between two scrapes of one histogram (a restart resets the counts)."""
    if not before:
        return dict(now)
    out = {le: count - before.get(le, 0) for le, count in now.items()}
    return dict(now) if any(v < 0 for v in out.values()) else out


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket that holds
    the rank; the highest finite bound when it falls in +Inf; None without observations.
    Hand-written: prometheus_client parses histograms but computes no quantiles."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, buckets[bounds[-1]] if bounds else 0)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def metrics_url(text: str) -> str:
    """What a user types for an endpoint: ``host:port`` means ``http://host:port/metrics``."""
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    return parts._replace(path="/metrics").geturl() if parts.path in ("", "/") else text


def fetch(url: str, token: str | None = None, timeout: float = 5.0) -> Snapshot:
    """Scrape and parse a poolwatch ``/metrics`` endpoint; a ``UsageError`` says what is wrong."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UsageError(f"{url!r} is not an http(s) URL; e.g. http://127.0.0.1:9464/metrics")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as r:
            text = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UsageError(
                f"{url} answered 401 Unauthorized: give its bearer token with --token "
                "or POOLWATCH_METRICS_TOKEN"
            ) from None
        raise UsageError(
            f"{url} answered HTTP {exc.code} {exc.reason}: not a poolwatch /metrics endpoint"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UsageError(
            f"cannot reach {url} ({reason}): is the app running, is this its metrics port?"
        ) from None
    try:
        snap = parse(text)
    except Exception:  # whatever the parser makes of HTML, JSON...
        snap = None
    if snap is None or not snap.is_poolwatch:
        raise UsageError(
            f"{url} is not a poolwatch /metrics endpoint (no poolwatch_build_info series); "
            "point at an instrumented app's or `poolwatch exporter`'s /metrics"
        )
    return snap
