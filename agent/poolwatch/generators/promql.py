"""Every PromQL expression of the generated rules and dashboards, written once.

Metric names come from the metric contract (``poolwatch/metrics.py``), never copied strings.
Every series selector starts with the ``SELECTOR`` mark, where the deployment's selector goes
(``job=~"shop.*"``, from the threshold table or the chart's values): ``with_selector`` fills it
in when a file is written, the Helm chart when it is installed (``helm.py``).

Each threshold signal is one recording rule, per process (the ``worker`` label kept): the alerts
and the dashboards read the recorded series (``recorded``), as the monitoring mixins do, so an
alert and the panel it links to show the same number. Recorded series are selected already;
the selector goes on the raw series only.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import metrics as m

SELECTOR = "@@SELECTOR@@"

# Prometheus label names (OTel attribute names translated, as the exporters do)
POOL = m.prom_label("db.client.connection.pool.name")
STATE = m.prom_label("db.client.connection.state")
HTTP_STATE = m.prom_label("http.connection.state")
SCHEME = m.prom_label("url.scheme")
SERVER = "server_address, server_port"  # an upstream host, or a database server
WORKER = "worker"  # a worker process of a multi-worker pod (`poolwatch exporter`)


def series(metric: m.Metric, *matchers: str, part: str = "") -> str:
    """``metric{<selector>, matchers...}``; ``part`` of a histogram: bucket, count or sum."""
    return f"{metric.sample(part)}{{{SELECTOR}{', '.join(x for x in matchers if x)}}}"


def with_selector(text: str, selector: str, quote: Callable[[str], str] = str) -> str:
    """``text`` with ``selector`` at every mark (``quote`` escapes it, e.g. inside JSON)."""
    if selector == SELECTOR:  # keep the marks (the Helm chart fills them in)
        return text
    alone = quote("{" + selector + "}") if selector else ""
    text = text.replace("{" + SELECTOR + "}", alone)
    return text.replace(SELECTOR, quote(f"{selector}, ") if selector else "")


# --- the signals: one recording rule each ------------------------------------------------------
def pool_utilization(window: str) -> str:
    used = series(m.DB_COUNT, f'{STATE}="used"')
    return f"sum without ({STATE}) ({used})\n/ ({series(m.DB_MAX)} > 0)"


def connection_wait_p99(window: str) -> str:
    return p99_per_process(m.DB_WAIT_TIME, window)


def overflow_usage(window: str) -> str:
    max_overflow = f"{series(m.DB_MAX)} - {series(m.DB_IDLE_MAX)}"
    return f"{series(m.SA_OVERFLOW)}\n/ (({max_overflow}) > 0)"


def failed_checkouts(window: str) -> str:
    return f"rate({series(m.DB_TIMEOUTS)}[{window}]) * 60"


def loop_lag_p99(window: str) -> str:
    return p99_per_process(m.LOOP_LAG, window)


def http_client_utilization(window: str) -> str:
    # aiohttp: per upstream host against limit_per_host where one is set, and the connector's
    # total against its limit; a limit of 0 is aiohttp's "unlimited" and is left out.
    # httpx: a client's pools (labelled httpx_client_name) against max_connections; an
    # unlimited pool exports no limit. Each side's series carry labels the other's lack, so
    # neither is divided by the other's limit.
    active = series(m.HTTP_CLIENT_OPEN, f'{HTTP_STATE}="active"')
    per_host = series(m.AIOHTTP_LIMIT, 'scope="per_host"')
    total = series(m.AIOHTTP_LIMIT, 'scope="total"')
    httpx_total = series(m.HTTPX_LIMIT, 'scope="total"')
    return (
        f"sum without ({HTTP_STATE}, {SCHEME}) ({active})\n"
        f"/ ignoring ({SERVER}) group_left\n"
        f"  max without (scope) ({per_host} > 0)\n"
        "or\n"
        f"sum without ({HTTP_STATE}, {SCHEME}, {SERVER}) ({active})\n"
        f"/ max without (scope) ({total} > 0)\n"
        "or\n"
        f"sum without ({HTTP_STATE}, {SCHEME}, {SERVER}) ({active})\n"
        f"/ max without (scope) ({httpx_total} > 0)"
    )


def fleet_connection_budget(window: str) -> str:
    # Every pool of every replica and worker against the capacity of its server, reported by
    # `poolwatch exporter --postgres-dsn` (any of its replicas).
    return f"{pools_max_by_server()}\n/ on ({SERVER})\n{server_usable()}"


SIGNALS: dict[str, Callable[[str], str]] = {
    "pool_utilization": pool_utilization,
    "connection_wait_p99": connection_wait_p99,
    "overflow_usage": overflow_usage,
    "failed_checkouts": failed_checkouts,
    "loop_lag_p99": loop_lag_p99,
    "http_client_utilization": http_client_utilization,
    "fleet_connection_budget": fleet_connection_budget,
}
RECORDS = {  # signal -> the series its recording rule writes
    "pool_utilization": "poolwatch:db_client_connection_utilization:ratio",
    "connection_wait_p99": "poolwatch:db_client_connection_wait_time_seconds:p99",
    "overflow_usage": "poolwatch:sqlalchemy_pool_overflow_usage:ratio",
    "failed_checkouts": "poolwatch:db_client_connection_timeouts:per_minute",
    "loop_lag_p99": "poolwatch:asyncio_event_loop_lag_seconds:p99",
    "http_client_utilization": "poolwatch:http_client_connection_utilization:ratio",
    "fleet_connection_budget": "poolwatch:db_client_connection_fleet_budget:ratio",
}


def recorded(signal: str, *matchers: str) -> str:
    """The recorded series of a signal (selected already: no selector mark)."""
    body = ", ".join(x for x in matchers if x)
    return f"{RECORDS[signal]}{{{body}}}" if body else RECORDS[signal]


# --- pieces shared by rules and panels ----------------------------------------------------------
def p99_per_process(metric: m.Metric, window: str) -> str:
    """The p99 of each process's histogram (NaN without observations is dropped by ``>= 0``)."""
    return f"histogram_quantile(0.99, rate({series(metric, part='bucket')}[{window}])) >= 0"


def pools_max_by_server() -> str:
    """Sum of every pool's max over the whole fleet, per database server. The server is read from
    the default pool name ``host:port/database``; a pool given its own name is left out."""
    pattern = '"(.+):([0-9]+)/.*"'
    with_server = (
        f"label_replace(label_replace({series(m.DB_MAX)},\n"
        f'    "server_address", "$1", "{POOL}", {pattern}),\n'
        f'    "server_port", "$2", "{POOL}", {pattern})'
    )
    return f"sum by ({SERVER}) (\n  {with_server}\n)"


def server_usable() -> str:
    """max_connections minus reserved slots, per server (several exporters may see one server:
    ``max`` keeps one)."""
    usable = f"{series(m.PG_CONNECTION_MAX)} - {series(m.PG_CONNECTION_RESERVED)}"
    return f"max by ({SERVER}) ({usable} > 0)"


# --- panel queries ------------------------------------------------------------------------------
# ``matchers`` are the dashboard's variable filters; ``window`` Grafana's $__rate_interval.
def quantile(metric: m.Metric, matchers: str, by: str, window: str, q: float = 0.99) -> str:
    buckets = series(metric, matchers, part="bucket")
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({buckets}[{window}])))"


def per_minute(metric: m.Metric, matchers: str, by: str, window: str) -> str:
    return f"sum by ({by}) (rate({series(metric, matchers)}[{window}])) * 60"


def increase_buckets(metric: m.Metric, matchers: str, window: str) -> str:
    """Observations per bucket and interval: a heatmap."""
    return f"sum by (le) (increase({series(metric, matchers, part='bucket')}[{window}]))"


def fleet_used_ratio(matchers: str, by: str) -> str:
    """Connections in use / pool max, summed over every replica (per ``by``)."""
    used = series(m.DB_COUNT, matchers, f'{STATE}="used"')
    return f"sum by ({by}) ({used}) / sum by ({by}) ({series(m.DB_MAX, matchers)})"


def http_errors(matchers: str, by: str, window: str) -> str:
    """5xx share of requests; 0 (not "no data") when there are requests but no errors."""
    count = m.HTTP_SERVER_DURATION
    total = f"sum by ({by}) (rate({series(count, matchers, part='count')}[{window}]))"
    five = series(count, matchers, 'http_response_status_code=~"5.."', part="count")
    errors = f"sum by ({by}) (rate({five}[{window}]))"
    return f"({errors} or {total} * 0) / {total}"


def request_rate(matchers: str, by: str, window: str) -> str:
    count = series(m.HTTP_SERVER_DURATION, matchers, part="count")
    return f"sum by ({by}) (rate({count}[{window}]))"


def agent_errors(matchers: str, window: str) -> str:
    """Errors per probe, and 0 for a process without any (so the panel is not empty)."""
    errors = f"sum by (job, probe) (increase({series(m.AGENT_ERRORS, matchers)}[{window}]))"
    return f"{errors} or sum by (job) ({series(m.BUILD_INFO, matchers)}) * 0"


def antipatterns(matchers: str, window: str) -> str:
    """Anti-patterns caught per kind (the series at 0 of each kind on: never "no data")."""
    return f"sum by (job, kind) (increase({series(m.ANTIPATTERNS, matchers)}[{window}]))"


def queries_per_request(matchers: str, window: str) -> str:
    """The average database queries per request, by route."""
    by = "job, " + m.prom_label("http.route")
    total = f"sum by ({by}) (rate({series(m.REQUEST_QUERIES, matchers, part='sum')}[{window}]))"
    count = series(m.REQUEST_QUERIES, matchers, part="count")
    return f"{total}\n/ sum by ({by}) (rate({count}[{window}]) > 0)"


def processes(matchers: str) -> str:
    return f"count by (job, version) ({series(m.BUILD_INFO, matchers)})"


def blocked_fraction(how: str, matchers: str, window: str) -> str:
    """Share of wall time each worker's loop was blocked, ``how`` (max, avg) per job."""
    return f"{how} by (job) (rate({series(m.LOOP_BLOCKED, matchers)}[{window}]))"


def top_culprits(matchers: str) -> str:
    blocks = series(m.LOOP_BLOCKS, matchers)
    return f"topk(10, sum by (job, culprit) (increase({blocks}[$__range])))"


def gauge(how: str, metric: m.Metric, matchers: str, by: str = "job") -> str:
    """``how`` (sum, max) of a gauge per ``by``; ``by=""`` for one series."""
    grouping = f" by ({by}) " if by else ""
    return f"{how}{grouping}({series(metric, matchers)})"


def server_connections() -> str:
    """Client connections the database server holds, by state (each exporter sees them all)."""
    per_exporter = (
        f"max by ({SERVER}, db_namespace, state, application_name) "
        f"({series(m.PG_CONNECTION_COUNT)})"
    )
    return f"sum by ({SERVER}, state) ({per_exporter})"


def idle_in_transaction() -> str:
    """The longest idle-in-transaction age per application, 0 for a server without any."""
    age = series(m.PG_IDLE_IN_TRANSACTION)
    return (
        f"max by ({SERVER}, application_name) ({age}) or max by ({SERVER}) ({series(m.PG_UP)}) * 0"
    )


def label_values(metric: m.Metric, label: str, matchers: str = "") -> str:
    """A Grafana variable's query."""
    return f"label_values({series(metric, matchers)}, {label})"
