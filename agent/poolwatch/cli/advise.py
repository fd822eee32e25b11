"""``poolwatch advise``: pool sizes from observed traffic (Little's law), and the fleet budget.

Per pool and per process (each worker process has its own pool):

- arrival rate = (successful checkouts + timed-out ones) per second, from wait_time's count and
  the timeouts counter;
- hold time from use_time (the mean for Little's law; p50/p95 shown);
- ``pool_size`` = ceil(rate * mean hold * 1.5): the sizing guide's formula, the connections busy
  on average plus 50 % headroom, kept open;
- ``max_overflow`` covers bursts on top: the total is ceil(1.5 * the worst concurrency seen),
  that concurrency being the larger of peak used + pending and rate * p95 hold; when checkouts
  timed out, demand was above the current max, so the total is at least ceil(1.5 * (max + 1)).
- Peaks come from the pools' high-water marks (``poolwatch_db_client_connection_*_max``), so a
  burst between two samples is seen whatever ``--interval`` is; a pool that queued (timeouts, or
  a wait p95 over the warning threshold) is never advised smaller than it is.

Data comes from a ``/metrics`` URL sampled over ``--window`` seconds, or from a Prometheus
server over ``--range`` (one instant query per figure, aggregated by pool in PromQL).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .. import metrics as m
from ..thresholds import duration_seconds, load
from ._common import UsageError, non_negative_int, positive_int, positive_seconds
from .scrape import POOL, STATE, Buckets, Snapshot, delta, fetch, metrics_url, quantile

ROUTE = m.prom_label("http.route")

HEADROOM = 1.5  # the sizing guide's factor
POSTGRES_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections


@dataclass
class Observation:
    """What one pool did over the observed window, per process where it says so."""

    pool: str
    seconds: float
    processes: int = 1  # processes (workers) that have this pool
    checkouts: float = 0  # successful, all processes
    timeouts: float = 0  # all processes
    hold_buckets: Buckets = field(default_factory=dict)
    wait_buckets: Buckets = field(default_factory=dict)
    hold_sum: float = 0
    hold_count: float = 0
    peak_used: float = 0  # in any one process
    peak_demand: float = 0  # used + pending at one moment, in any one process
    pool_size: float | None = None  # SQLAlchemy pool_size / asyncpg max_size, now
    max: float | None = None  # now
    sqlalchemy: bool = False
    idle_min: float | None = None  # asyncpg, psycopg_pool: min_size (redis pools have none)

    @property
    def kind(self) -> str:
        """The library, told by the series its probe exports: SQLAlchemy alone has overflow,
        asyncpg idle max and min, psycopg_pool idle min only, redis max only."""
        if self.sqlalchemy:
            return "SQLAlchemy"
        if self.max is None:
            return "pool"
        if self.pool_size is not None:
            return "asyncpg"
        return "psycopg_pool" if self.idle_min is not None else "redis"

    @property
    def rate(self) -> float:
        """Arrivals per second per process: served and timed out."""
        return (self.checkouts + self.timeouts) / self.seconds / self.processes

    @property
    def hold_mean(self) -> float | None:
        return self.hold_sum / self.hold_count if self.hold_count > 0 else None


@dataclass
class Advice:
    pool_size: int
    max_overflow: int
    reasoning: str

    @property
    def total(self) -> int:
        return self.pool_size + self.max_overflow


def recommend(obs: Observation) -> Advice | None:
    """None when there was no traffic to size from."""
    hold = obs.hold_mean
    if hold is None or obs.rate <= 0:
        return None
    rate = obs.rate
    busy = rate * hold  # Little's law: connections in use on average
    pool_size = max(1, math.ceil(busy * HEADROOM))
    p95 = quantile(0.95, obs.hold_buckets) or hold
    burst = max(obs.peak_demand, rate * p95)
    why_burst = (
        f"bursts max(peak {obs.peak_demand:g} used+pending, {rate:.1f}/s x p95 {_ms(p95)} "
        f"= {rate * p95:.1f})"
    )
    if obs.timeouts > 0 and obs.max is not None and burst < obs.max + 1:
        burst = obs.max + 1
        why_burst = f"{obs.timeouts:.0f} timeouts: demand exceeded max {obs.max:g}, so >= {burst:g}"
    total = max(pool_size, math.ceil(burst * HEADROOM))
    reasoning = (
        f"{rate:.1f}/s x {_ms(hold)} mean hold = {busy:.1f} busy x {HEADROOM} -> "
        f"pool_size {pool_size}; {why_burst} x {HEADROOM} -> {total} in all"
    )
    queued = _queued(obs)
    kept = []
    if queued and obs.max is not None and total < obs.max:
        total = math.ceil(obs.max)
        kept.append(f"max at {total}")
    if queued and obs.pool_size is not None and pool_size < obs.pool_size:
        pool_size = min(math.ceil(obs.pool_size), total)
        kept.append(f"pool_size at {pool_size}")
    if kept:
        reasoning += f"; it queued ({queued}): never smaller, {' and '.join(kept)} kept"
    return Advice(pool_size, total - pool_size, reasoning)


def _queued(obs: Observation) -> str | None:
    """Why the pool must not shrink: it timed out, or checkouts waited (p95 over the warning
    threshold of the connection wait alert) in the window. None: it did not queue."""
    if obs.timeouts > 0:
        return f"{obs.timeouts:.0f} checkouts timed out"
    warning = load()["connection_wait_p99"].warning
    p95 = quantile(0.95, obs.wait_buckets)
    if p95 is not None and p95 > warning:
        return f"wait p95 {_ms(p95)} > {_ms(warning)}"
    return None


# --- from a /metrics URL ------------------------------------------------------------------


def from_snapshots(first: Snapshot, last: Snapshot, samples: list[Snapshot], seconds: float):
    """Observations from the first and last scrape of a window and every sample in between."""
    out: dict[str, Observation] = {}
    for key, row in last.pools.items():
        obs = out.setdefault(row.pool, Observation(row.pool, seconds, processes=0))
        before = first.pools.get(key)
        obs.processes += 1
        obs.checkouts += max(row.wait_count - (before.wait_count if before else 0), 0)
        obs.timeouts += max(row.timeouts - (before.timeouts if before else 0), 0)
        for le, count in delta(row.use_buckets, before.use_buckets if before else None).items():
            obs.hold_buckets[le] = obs.hold_buckets.get(le, 0) + count
        for le, count in delta(row.wait_buckets, before.wait_buckets if before else None).items():
            obs.wait_buckets[le] = obs.wait_buckets.get(le, 0) + count
        obs.hold_sum += row.use_sum - (before.use_sum if before else 0)
        obs.hold_count += row.use_count - (before.use_count if before else 0)
        obs.pool_size = _max(obs.pool_size, row.idle_max)
        obs.idle_min = _max(obs.idle_min, row.idle_min)
        obs.max = _max(obs.max, row.max)
        obs.sqlalchemy = obs.sqlalchemy or row.overflow is not None
        for snap in samples[1:]:  # the first sample's peaks are from before the window
            if (seen := snap.pools.get(key)) is not None:
                # the high-water marks: a burst between two samples counts too
                used = max(seen.used, seen.peak_used or 0)
                demand = max(seen.used + seen.pending, seen.peak_demand or 0)
                obs.peak_used = max(obs.peak_used, used)
                obs.peak_demand = max(obs.peak_demand, demand, used)
    return list(out.values())


def sample(url: str, token: str | None, window: float, interval: float):
    """Scrape ``url`` every ``interval`` for ``window`` seconds (Ctrl-C ends early)."""
    first = fetch(url, token)
    started = time.monotonic()
    samples, last, ended = [first], first, started
    print(f"sampling {url} for {window:g} s (Ctrl-C to stop early)...", file=sys.stderr)
    try:
        while time.monotonic() - started < window:
            time.sleep(min(interval, max(window - (time.monotonic() - started), 0)))
            last, ended = fetch(url, token), time.monotonic()
            samples.append(last)
    except KeyboardInterrupt:
        pass
    return first, last, samples, ended - started


# --- the fleet --------------------------------------------------------------------------------


@dataclass
class Budget:
    max_connections: int
    reserved: int
    processes: int
    how: str  # where the process count comes from

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved


def fleet_lines(budget: Budget, per_process_now: float | None, per_process_advised: int) -> list:
    signal = load()["fleet_connection_budget"]
    lines = [
        f"fleet: {budget.processes} processes ({budget.how}); server max_connections "
        f"{budget.max_connections} - {budget.reserved} reserved = {budget.usable} usable"
    ]
    for label, per_process in (("now", per_process_now), ("advised", per_process_advised)):
        if per_process is None:
            continue
        total = budget.processes * per_process
        ratio = total / budget.usable if budget.usable > 0 else math.inf
        verdict = {
            "ok": "fits",
            "warning": f"fits, but above the {signal.warning:.0%} warning line",
            "critical": "does NOT fit: over budget",
        }[signal.level(ratio)]
        lines.append(
            f"  {label:<8} {budget.processes} x {per_process:g} = {total:g} connections, "
            f"{ratio:.0%} of usable: {verdict}"
        )
        if label == "advised" and ratio > signal.warning:
            cap = math.floor(budget.usable * signal.warning / budget.processes)
            lines.append(
                f"  to fit under {signal.warning:.0%}, cap each process at {cap} connections in "
                "all pools, or put PgBouncer (transaction pooling) between the fleet and the server"
            )
    return lines


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "url", nargs="?", type=metrics_url, help="a poolwatch /metrics URL (or host:port) to sample"
    )
    parser.add_argument(
        "--window", type=positive_seconds, default=60.0, help="seconds to sample the URL (60)"
    )
    parser.add_argument(
        "--interval", type=positive_seconds, default=1.0, help="seconds between samples (1)"
    )
    parser.add_argument("--prometheus", metavar="URL", help="a Prometheus server instead of a URL")
    parser.add_argument("--range", default="1h", help="Prometheus range to look back (1h)")
    parser.add_argument(
        "--selector", default="", help='Prometheus label matchers, e.g. job="api",namespace="prod"'
    )
    parser.add_argument(
        "--pool", action="append", help="only this pool (repeatable); default: every pool"
    )
    parser.add_argument("--max-connections", type=positive_int, help="the server's max_connections")
    parser.add_argument(
        "--reserved-connections",
        type=non_negative_int,
        help=f"slots the app cannot use (default: the exporter's view, else {POSTGRES_RESERVED})",
    )
    parser.add_argument("--replicas", type=positive_int, help="pods (replicas) of the app")
    parser.add_argument("--workers", type=positive_int, help="worker processes per replica")
    parser.add_argument(
        "--token",
        default=os.environ.get("POOLWATCH_METRICS_TOKEN"),
        help="bearer token of the /metrics URL (default: $POOLWATCH_METRICS_TOKEN)",
    )


def run(args: Any) -> int:
    if bool(args.url) == bool(args.prometheus):
        raise UsageError(
            "give either a /metrics URL to sample or --prometheus URL (with --range), not both"
        )
    server: dict[str, float] = {}
    if args.prometheus:
        try:
            duration_seconds(args.range)  # a bad range fails before any query
        except ValueError:
            raise UsageError(
                f"--range {args.range!r} is not a Prometheus duration; e.g. 30m, 1h, 1h30m, 7d"
            ) from None
        source = Prometheus(args.prometheus, args.selector)
        observations = source.observe(args.range)
        by_route = source.queries(args.range)
        where = f"{args.prometheus}, last {args.range}"
        seen_processes = max((o.processes for o in observations), default=1)
    else:
        first, last, samples, seconds = sample(args.url, args.token, args.window, args.interval)
        if seconds <= 0 or len(samples) < 2:
            raise UsageError("stopped before a second sample: nothing to compare")
        observations = from_snapshots(first, last, samples, seconds)
        by_route = queries_per_request(first, last)
        if not observations:
            raise no_data(args.url, "", "")
        where = f"{args.url}, {seconds:.1f} s sampled"
        seen_processes = max(o.processes for o in observations)
        server = _server_view(last)
    if args.pool:
        unknown = sorted(set(args.pool) - {o.pool for o in observations})
        if unknown:
            known = ", ".join(o.pool for o in observations)
            raise UsageError(f"--pool {unknown[0]!r} was not seen; pools seen: {known}")
        observations = [o for o in observations if o.pool in args.pool]
    for line in report(observations, where, by_route):
        print(line)
    max_connections = args.max_connections or server.get("max")
    if max_connections:
        if args.replicas or args.workers:
            processes = (args.replicas or 1) * (args.workers or 1)
            how = f"{args.replicas or 1} replicas x {args.workers or 1} workers"
        else:
            processes, how = seen_processes, "seen in the data; set --replicas/--workers"
        reserved = args.reserved_connections
        if reserved is None:
            reserved = int(server.get("reserved", POSTGRES_RESERVED))
        budget = Budget(int(max_connections), reserved, processes, how)
        postgres = [o for o in observations if o.kind != "redis"]  # not the database's
        advised = [recommend(o) for o in postgres]
        now = [o.max for o in postgres]
        per_process_now = None if None in now else sum(n for n in now if n is not None)
        per_process_advised = sum(
            a.total if a else int(o.max or 0) for a, o in zip(advised, postgres, strict=True)
        )
        print()
        for line in fleet_lines(budget, per_process_now, per_process_advised):
            print(line)
    return 0


def queries_per_request(first: Snapshot | None, last: Snapshot) -> dict[str, tuple[float, float]]:
    """Route -> (requests, queries) between two scrapes."""
    out = {}
    for route, (count, total) in last.queries.items():
        before = first.queries.get(route, (0.0, 0.0)) if first is not None else (0.0, 0.0)
        if count - before[0] > 0:
            out[route] = (count - before[0], total - before[1])
    return out


def queries_lines(by_route: dict[str, tuple[float, float]], seconds: float) -> list[str]:
    """The guide's "average queries per request", beside Little's law: requests/s x queries
    per request is the checkout rate the pools above must serve."""
    if not by_route:
        return []
    requests = sum(c for c, _ in by_route.values())
    queries = sum(q for _, q in by_route.values())
    lines = [
        "",
        f"requests   {requests / seconds:.1f}/s x {queries / requests:.1f} queries per request "
        f"(average) = {queries / seconds:.1f} queries/s",
    ]
    top = sorted(by_route.items(), key=lambda item: -item[1][1])[:5]
    for route, (count, total) in top:
        lines.append(f"  {route:<30} {count / seconds:6.1f} req/s x {total / count:5.1f} queries")
    return lines


def report(
    observations: list[Observation],
    where: str,
    by_route: dict[str, tuple[float, float]] | None = None,
) -> list[str]:
    lines = [f"poolwatch advise · {where}"]
    for obs in observations:
        kind = obs.kind
        lines.append("")
        processes = f"{obs.processes} process{'es' if obs.processes != 1 else ''}"
        lines.append(f"{obs.pool} ({kind}, {processes}){_now(obs)}")
        p50, p95 = quantile(0.5, obs.hold_buckets), quantile(0.95, obs.hold_buckets)
        lines.append(
            f"  observed   {obs.rate:.1f} checkouts/s per process "
            f"({obs.timeouts / obs.seconds / obs.processes:.1f}/s of them timed out), hold p50 "
            f"{_ms(p50)} p95 {_ms(p95)} mean {_ms(obs.hold_mean)}, peak used {obs.peak_used:g} "
            f"(+{obs.peak_demand - obs.peak_used:g} pending), timeouts {obs.timeouts:.0f}"
        )
        advice = recommend(obs)
        if advice is None:
            lines.append("  recommend  nothing: no checkouts in the window to size from")
            continue
        if obs.sqlalchemy or obs.max is None:
            sizes = f"pool_size={advice.pool_size} max_overflow={advice.max_overflow}"
        elif kind == "redis":  # no minimum: connections are opened on demand and kept
            sizes = f"max_connections={advice.total}"
        else:
            sizes = f"min_size={advice.pool_size} max_size={advice.total}"
        lines.append(f"  recommend  {sizes}: {advice.reasoning}")
    seconds = max((o.seconds for o in observations), default=0)
    if by_route and seconds > 0:
        lines.extend(queries_lines(by_route, seconds))
    return lines


def _now(obs: Observation) -> str:
    if obs.max is None:
        return ""
    if obs.sqlalchemy and obs.pool_size is not None:
        return f", now pool_size={obs.pool_size:g} max_overflow={obs.max - obs.pool_size:g}"
    return f", now max {obs.max:g}"


def _server_view(snap: Snapshot) -> dict[str, float]:
    """max_connections and reserved slots from the sidecar's database view, when present."""
    view = {}
    if (value := snap.other.get(m.PG_CONNECTION_MAX.sample())) is not None:
        view["max"] = value
    if (value := snap.other.get(m.PG_CONNECTION_RESERVED.sample())) is not None:
        view["reserved"] = value
    return view


def no_data(where: str, when: str, selector: str) -> Exception:
    matched = f" matching {{{selector}}}" if selector else ""
    return UsageError(
        f"no poolwatch pool series at {where}{matched}{' ' + when if when else ''}: is an "
        "instrumented app with a database pool being scraped?"
    )


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


# --- from a Prometheus server -------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, selector: str = "") -> None:
        self.url = url.rstrip("/")
        self.selector = selector.strip().strip("{}").strip()

    def series(self, name: str, extra: str = "") -> str:
        matchers = ",".join(m for m in (self.selector, extra) if m)
        return f"{name}{{{matchers}}}"

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise UsageError(f"Prometheus at {self.url} rejected a query: {reason}") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UsageError(
                f"cannot query Prometheus at {self.url} ({reason}): is this its base URL, "
                "e.g. http://prometheus:9090?"
            ) from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise UsageError(f"{self.url} did not answer like Prometheus' /api/v1/query")
        return [
            (item["metric"], float(item["value"][1]))
            for item in body["data"]["result"]
            if math.isfinite(float(item["value"][1]))
        ]

    def by_pool(self, promql: str) -> dict[str, float]:
        return {labels.get(POOL, ""): value for labels, value in self.query(promql)}

    def observe(self, range_text: str) -> list[Observation]:
        seconds = duration_seconds(range_text)
        r, by = range_text, f"by ({POOL})"
        pending = self.series(m.DB_PENDING.sample())
        used = self.series(m.DB_COUNT.sample(), f'{STATE}="used"')
        processes = self.by_pool(f"count {by} (last_over_time({pending}[{r}]))")
        if not processes:
            raise no_data(f"Prometheus at {self.url}", f"in the last {r}", self.selector)

        def increase(name: str) -> dict[str, float]:
            return self.by_pool(f"sum {by} (increase({self.series(name)}[{r}]))")

        def last(name: str) -> dict[str, float]:
            return self.by_pool(f"max {by} (last_over_time({self.series(name)}[{r}]))")

        checkouts = increase(m.DB_WAIT_TIME.sample("count"))
        timeouts = increase(m.DB_TIMEOUTS.sample())
        hold_sum = increase(m.DB_USE_TIME.sample("sum"))
        hold_count = increase(m.DB_USE_TIME.sample("count"))
        buckets = self.query(
            f"sum by ({POOL}, le) (increase({self.series(m.DB_USE_TIME.sample('bucket'))}[{r}]))"
        )
        peak_used = self.by_pool(f"max {by} (max_over_time({used}[{r}]))")
        peak_demand = self.by_pool(
            f"max {by} (max_over_time(({used} + ignoring({STATE}) {pending})[{r}:]))"
        )
        # the high-water marks: the bursts between two scrapes
        used_max = self.series(m.DB_USED_PEAK.sample())
        marks = self.by_pool(f"max {by} (max_over_time({used_max}[{r}]))")
        demand_max = self.series(m.DB_DEMAND_PEAK.sample())
        demand_marks = self.by_pool(f"max {by} (max_over_time({demand_max}[{r}]))")
        for pool, value in marks.items():
            peak_used[pool] = max(peak_used.get(pool, 0), value)
        for pool, value in demand_marks.items():
            peak_demand[pool] = max(peak_demand.get(pool, 0), value)
        wait = self.query(
            f"sum by ({POOL}, le) (increase({self.series(m.DB_WAIT_TIME.sample('bucket'))}[{r}]))"
        )
        pool_size, maximum = last(m.DB_IDLE_MAX.sample()), last(m.DB_MAX.sample())
        idle_min = last(m.DB_IDLE_MIN.sample())
        sqlalchemy = last(m.SA_OVERFLOW.sample())
        out = []
        for pool, count in sorted(processes.items()):
            obs = Observation(
                pool,
                seconds,
                processes=int(count),
                checkouts=checkouts.get(pool, 0),
                timeouts=timeouts.get(pool, 0),
                hold_sum=hold_sum.get(pool, 0),
                hold_count=hold_count.get(pool, 0),
                peak_used=peak_used.get(pool, 0),
                # the subquery's resolution may miss the raw peak: never below peak used
                peak_demand=max(peak_demand.get(pool, 0), peak_used.get(pool, 0)),
                pool_size=pool_size.get(pool),
                max=maximum.get(pool),
                sqlalchemy=pool in sqlalchemy,
                idle_min=idle_min.get(pool),
            )
            obs.hold_buckets = {
                float(labels["le"]): value for labels, value in buckets if labels.get(POOL) == pool
            }
            obs.wait_buckets = {
                float(labels["le"]): value for labels, value in wait if labels.get(POOL) == pool
            }
            out.append(obs)
        return out

    def queries(self, range_text: str) -> dict[str, tuple[float, float]]:
        """Route -> (requests, queries) over the range."""
        by = f"by ({ROUTE})"
        counts, sums = (
            {
                labels.get(ROUTE, ""): value
                for labels, value in self.query(
                    f"sum {by} (increase({self.series(m.REQUEST_QUERIES.sample(part))}"
                    f"[{range_text}]))"
                )
            }
            for part in ("count", "sum")
        )
        return {route: (count, sums.get(route, 0.0)) for route, count in counts.items()}
