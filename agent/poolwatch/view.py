"""A compact terminal view of poolwatch metrics, from parsed exposition text.

Used by ``poolwatch demo`` (its own endpoint) and ``poolwatch top`` (any endpoint).
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

POOL = "db_client_connection_pool_name"
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
    overflow: float | None = None  # SQLAlchemy only
    leaks: float = 0
    wait_buckets: Buckets = field(default_factory=dict)
    use_buckets: Buckets = field(default_factory=dict)
    use_count: float = 0
    use_sum: float = 0


@dataclass
class HostRow:
    """An aiohttp upstream (``server_address:server_port``) of one process."""

    name: str
    worker: str | None = None
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

    @property
    def is_poolwatch(self) -> bool:
        """An agent's /metrics, or `poolwatch exporter`'s (which may have no worker yet)."""
        return "poolwatch_build_info" in self.other or "poolwatch_exporter_workers" in self.other


# sample name -> PoolRow attribute, for the plain (non-bucket) pool series
_POOL_FIELDS = {
    "db_client_connection_max": "max",
    "db_client_connection_idle_max": "idle_max",
    "db_client_connection_pending_requests": "pending",
    "db_client_connection_timeouts_total": "timeouts",
    "db_client_connection_wait_time_seconds_count": "wait_count",
    "db_client_connection_wait_time_seconds_sum": "wait_sum",
    "db_client_connection_use_time_seconds_count": "use_count",
    "db_client_connection_use_time_seconds_sum": "use_sum",
    "sqlalchemy_pool_overflow": "overflow",
    "poolwatch_connection_leaks_total": "leaks",
}
_HOST = ("server_address", "server_port")


def _le(labels: dict[str, str]) -> float:
    return float(labels["le"])  # "+Inf" parses as inf


def parse(text: str) -> Snapshot:
    """Parse exposition text (raises ValueError when it is not exposition text)."""
    snap = Snapshot()
    totals: dict[str, float] = defaultdict(float)
    # worker -> scope -> connector limits not labelled by host (0 means unlimited in aiohttp)
    limits: dict[str | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            totals[name] += value
            worker = labels.get(WORKER)
            if (pool_name := labels.get(POOL)) is not None:
                _pool_sample(snap, pool_name, worker, name, labels, value)
            elif name.startswith(("http_client_", "aiohttp_client_")):
                if all(k in labels for k in _HOST):
                    _host_sample(snap, labels, worker, name, value)
                elif name == "aiohttp_client_connection_limit":
                    limits[worker][labels.get("scope", "total")] += value
            elif name.startswith(("asyncio_event_loop_", "asyncio_tasks")):
                _loop_sample(snap, worker or "", name, labels, value)
    for host in snap.hosts.values():
        scopes = limits.get(host.worker, {})
        if host.limit is None:
            host.limit = scopes.get("per_host") or scopes.get("total") or None
    snap.other = dict(totals)
    return snap


def _key(name: str, worker: str | None) -> str:
    return f"{name} [{worker}]" if worker else name


def _pool_sample(
    snap: Snapshot, pool: str, worker: str | None, name: str, labels: dict, value: float
) -> None:
    key = _key(pool, worker)
    row = snap.pools.get(key)
    if row is None:
        row = snap.pools[key] = PoolRow(key, pool=pool, worker=worker)
    if name == "db_client_connection_count":
        setattr(
            row, "idle" if labels.get("db_client_connection_state") == "idle" else "used", value
        )
    elif (attribute := _POOL_FIELDS.get(name)) is not None:
        setattr(row, attribute, value)
    elif name == "db_client_connection_wait_time_seconds_bucket":
        row.wait_buckets[_le(labels)] = value
    elif name == "db_client_connection_use_time_seconds_bucket":
        row.use_buckets[_le(labels)] = value


def _host_sample(snap: Snapshot, labels: dict, worker: str | None, name: str, value: float):
    key = _key(f"{labels['server_address']}:{labels['server_port']}", worker)
    row = snap.hosts.setdefault(key, HostRow(key, worker))
    if name == "http_client_open_connections":
        state = labels.get("http_connection_state")
        if state in ("active", "idle"):
            setattr(row, state, getattr(row, state) + value)  # summed over url_scheme
    elif name == "aiohttp_client_connection_limit":
        row.limit = value or None
    elif name == "aiohttp_client_pending_requests":
        row.pending = value
    elif name == "aiohttp_client_connection_wait_time_seconds_bucket":
        row.wait_buckets[_le(labels)] = value


def _loop_sample(snap: Snapshot, worker: str, name: str, labels: dict, value: float) -> None:
    row = snap.loops.setdefault(worker, LoopRow(worker))
    if name == "asyncio_event_loop_lag_seconds_bucket":
        row.lag_buckets[_le(labels)] = value
    elif name == "asyncio_event_loop_lag_seconds_count":
        row.lag_count = value
    elif name == "asyncio_event_loop_lag_seconds_sum":
        row.lag_sum = value
    elif name == "asyncio_event_loop_blocks_total":
        culprit = labels.get("culprit", "?")
        row.blocks[culprit] = row.blocks.get(culprit, 0) + value
    elif name == "asyncio_event_loop_blocked_seconds_total":
        row.blocked_seconds = value
    elif name == "asyncio_tasks":
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


def fetch(url: str, token: str | None = None, timeout: float = 5.0) -> Snapshot:
    """Scrape and parse a poolwatch ``/metrics`` endpoint; a ``UsageError`` says what is wrong."""
    from .cli import UsageError

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


def bar(used: float, limit: float | None, width: int = 20) -> str:
    if not limit:
        return "-" * width
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)


def render_lines(
    snap: Snapshot, previous: Snapshot | None = None, interval: float = 1.0
) -> list[str]:
    """Plain-text lines: one per pool, then the loop line when the loop probe exports data."""
    lines = [
        f"{'pool':<32} {'used/max':<9} {'':<20} {'pending':>7} {'timeouts':>8} {'avg wait ms':>11}"
    ]
    for row in snap.pools.values():
        wait_ms = 0.0
        before = previous.pools.get(row.name) if previous else None
        count = row.wait_count - (before.wait_count if before else 0)
        if count > 0:
            wait_ms = 1000 * (row.wait_sum - (before.wait_sum if before else 0)) / count
        limit = f"{row.max:g}" if row.max is not None else "-"
        lines.append(
            f"{row.name[:32]:<32} {f'{row.used:g}/{limit}':<9} {bar(row.used, row.max)} "
            f"{row.pending:>7g} {row.timeouts:>8g} {wait_ms:>11.1f}"
        )
    blocks = snap.other.get("asyncio_event_loop_blocks_total")
    if blocks is not None:
        lag_count = snap.other.get("asyncio_event_loop_lag_seconds_count", 0)
        lag_sum = snap.other.get("asyncio_event_loop_lag_seconds_sum", 0)
        if previous is not None:
            lag_count -= previous.other.get("asyncio_event_loop_lag_seconds_count", 0)
            lag_sum -= previous.other.get("asyncio_event_loop_lag_seconds_sum", 0)
        mean_lag = 1000 * lag_sum / lag_count if lag_count > 0 else 0.0
        lines.append(f"event loop: mean lag {mean_lag:.1f} ms, blocks {blocks:g}")
    return lines
