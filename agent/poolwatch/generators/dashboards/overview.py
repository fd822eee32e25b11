"""poolwatch / Overview: per service, what is wrong now, HTTP server, pools and loop."""

from __future__ import annotations

from ... import metrics as m
from ...thresholds import Threshold
from .. import promql as q
from .kit import JP, RATE, TARGET, P, gd, graph, limits, new_dashboard, query, row, stat_panel


def worst(signal: str, by: str = "job") -> str:
    """The worst process's recorded value of a signal, per ``by``."""
    return f"max by ({by}) ({q.recorded(signal, TARGET)})"


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    util, wait, timeouts = t["pool_utilization"], t["connection_wait_p99"], t["failed_checkouts"]
    overflow, lag, client = t["overflow_usage"], t["loop_lag_p99"], t["http_client_utilization"]
    duration = m.HTTP_SERVER_DURATION
    return (
        new_dashboard(
            "overview",
            "poolwatch / Overview",
            "Per service: is a pool running dry, who waits, who blocks the event loop.",
        )
        .with_row(row(100, "What is wrong now (worst pool, host or worker per service)"))
        .with_panel(
            stat_panel(
                1,
                "Pool utilization",
                "Connections in use / pool max, worst pool and replica. Near 100 % requests "
                f"start to wait for connections. {limits(util)} Open Database pools to see "
                "which pool; raise the pool size if the database has room, else find the slow "
                "or leaked sessions.",
                query(worst("pool_utilization"), "{{job}}", instant=True),
                unit="percentunit",
                threshold=util,
            )
        )
        .with_panel(
            stat_panel(
                2,
                "Connection wait p99",
                "99th percentile of the time to get a connection from a pool, worst replica. "
                f"{limits(wait)} A high wait with a full pool: the pool is too small for the "
                "load or sessions are held too long (see use time on Database pools).",
                query(worst("connection_wait_p99"), "{{job}}", instant=True),
                unit="s",
                threshold=wait,
            )
        )
        .with_panel(
            stat_panel(
                3,
                "Checkout timeouts",
                "Checkouts that gave up waiting for a connection, per minute, worst pool. Each "
                f"one is a failed request. {limits(timeouts)} Look at pool utilization and use "
                "time; raise pool_timeout only after the cause is known.",
                query(
                    f"max by (job) (sum by ({JP}) ({q.recorded('failed_checkouts', TARGET)}))",
                    "{{job}}",
                    instant=True,
                ),
                unit="cpm",
                threshold=timeouts,
            )
        )
        .with_panel(
            stat_panel(
                4,
                "Overflow usage (SQLAlchemy)",
                "Overflow connections in use / max_overflow, worst pool and replica. Overflow is "
                f"for bursts; steady use means pool_size is too small. {limits(overflow)}",
                query(worst("overflow_usage"), "{{job}}", instant=True),
                unit="percentunit",
                threshold=overflow,
            )
        )
        .with_panel(
            stat_panel(
                5,
                "Event-loop lag p99",
                "99th percentile of how late the event loop runs a timer, worst worker. Every "
                f"request of that worker waits this long. {limits(lag)} Open Event loop to see "
                "which function blocks it.",
                query(worst("loop_lag_p99"), "{{job}}", instant=True),
                unit="s",
                threshold=lag,
            )
        )
        .with_panel(
            stat_panel(
                6,
                "HTTP client connector utilization",
                "Active aiohttp connections / connector limit (per host or total), worst "
                f"replica. At the limit, requests queue for a connection. {limits(client)} "
                "Open HTTP client pools to see which host.",
                query(worst("http_client_utilization"), "{{job}}", instant=True),
                unit="percentunit",
                threshold=client,
            )
        )
        .with_row(row(200, "HTTP server"))
        .with_panel(
            graph(
                7,
                "Request rate",
                "Requests per second served, per service (all replicas). A drop with rising "
                "errors or duration is the symptom the other panels explain.",
                [query(q.request_rate(TARGET, "job", RATE), "{{job}}")],
                unit="reqps",
                width=8,
            )
        )
        .with_panel(
            graph(
                8,
                "Error ratio (5xx)",
                "Share of responses with a 5xx status, per service. Pool timeouts surface here "
                "as 500/503: if they rise together with checkout timeouts, fix the pool first; "
                "else the application log has the errors.",
                [query(q.http_errors(TARGET, "job", RATE), "{{job}}")],
                unit="percentunit",
                width=8,
            )
        )
        .with_panel(
            graph(
                9,
                "Request duration p50 / p99",
                "Request latency over all replicas. A p99 far above p50 that tracks connection "
                "wait or loop lag points at the pool or a blocked loop, not the database.",
                [
                    query(q.quantile(duration, TARGET, "job", RATE, 0.5), "{{job}} p50"),
                    query(q.quantile(duration, TARGET, "job", RATE), "{{job}} p99"),
                ],
                unit="s",
                width=8,
            )
        )
        .with_row(row(300, "Pools and event loop"))
        .with_panel(
            graph(
                10,
                "Pool utilization (worst replica)",
                f"Connections in use / max per service and pool, worst replica. {limits(util)} "
                "Which pool and why: Database pools.",
                [query(worst("pool_utilization", JP), f"{{{{job}}}} {{{{{P}}}}}")],
                unit="percentunit",
                threshold=util,
                width=6,
            )
        )
        .with_panel(
            graph(
                11,
                "Connection wait p99",
                f"Time to get a connection, p99 over all replicas. {limits(wait)} Rising with "
                "utilization: the pool is too small or held too long (Database pools, use time).",
                [query(q.quantile(m.DB_WAIT_TIME, TARGET, JP, RATE), f"{{{{job}}}} {{{{{P}}}}}")],
                unit="s",
                threshold=wait,
                width=6,
            )
        )
        .with_panel(
            graph(
                12,
                "Checkout timeouts",
                f"Failed checkouts per minute, all replicas: each one is a failed request. "
                f"{limits(timeouts)} Find the full pool on Database pools.",
                [
                    query(
                        f"sum by ({JP}) ({q.recorded('failed_checkouts', TARGET)})",
                        f"{{{{job}}}} {{{{{P}}}}}",
                    )
                ],
                unit="cpm",
                threshold=timeouts,
                width=6,
            )
        )
        .with_panel(
            graph(
                13,
                "Event-loop lag p99",
                f"How late the loop runs timers, p99 over all workers. {limits(lag)} The culprit "
                "function is on Event loop.",
                [query(q.quantile(m.LOOP_LAG, TARGET, "job", RATE), "{{job}}")],
                unit="s",
                threshold=lag,
                width=6,
            )
        )
        .with_row(row(350, "Diagnosis"))
        .with_panel(
            graph(
                16,
                "Anti-patterns caught",
                "The guide's mistakes poolwatch caught in the app's code, per kind (an engine or "
                "client per request, a sync query on the loop, N+1 queries, a shared "
                "AsyncSession, a swallowed cancel, a pool left open). Non-zero: the app's log "
                "names the code and the fix; the runbook shows the wrong and the right code.",
                [query(q.antipatterns(TARGET, RATE), "{{job}} {{kind}}")],
                unit="short",
                bars=True,
                width=12,
            )
        )
        .with_panel(
            graph(
                17,
                "Queries per request",
                "Average database queries per request, by route: the guide's queries per "
                "request (connections needed = requests/s x queries/request x query time). A "
                "route far above the others often runs N+1 queries.",
                [query(q.queries_per_request(TARGET, RATE), "{{job}} {{http_route}}")],
                unit="short",
                width=12,
            )
        )
        .with_row(row(400, "poolwatch agent"))
        .with_panel(
            graph(
                14,
                "Agent errors",
                "Exceptions poolwatch caught inside its own hooks, per probe (the app's call "
                "went on). Non-zero: a probe is degraded; the log has one line per kind.",
                [query(q.agent_errors(TARGET, RATE), "{{job}} {{probe}}")],
                unit="short",
                bars=True,
                width=12,
            )
        )
        .with_panel(
            graph(
                15,
                "Instrumented processes",
                "Processes reporting, by poolwatch version. A drop without a deploy means "
                "targets are not scraped.",
                [query(q.processes(TARGET), "{{job}} {{version}}")],
                unit="short",
                width=12,
            )
        )
    )
