"""poolwatch / Database pools: every pool at a glance, then one repeated row per pool."""

from __future__ import annotations

from ... import metrics as m
from ...thresholds import Threshold
from .. import promql as q
from .kit import (
    JP,
    POOL,
    RATE,
    P,
    gd,
    graph,
    heatmap_panel,
    limits,
    new_dashboard,
    query,
    row,
    unit_text,
)


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    util, wait, timeouts = t["pool_utilization"], t["connection_wait_p99"], t["failed_checkouts"]
    overflow, budget = t["overflow_usage"], t["fleet_connection_budget"]
    legend = f"{{{{job}}}} {{{{{P}}}}}"
    one = POOL  # inside the repeated row, $pool is one pool
    board = (
        new_dashboard(
            "db",
            "poolwatch / Database pools",
            "SQLAlchemy and asyncpg pools: fill, waits, timeouts, hold times, leaks.",
            extra="pool",
        )
        .with_row(row(100, "All pools"))
        .with_panel(
            graph(
                2,
                "Pool utilization",
                "Connections in use / pool max per pool: the worst replica and the "
                f"fleet (sum used / sum max). {limits(util)} Near 100 % checkouts wait. If the "
                "database has room, size the pool by Little's law (arrival rate x hold time "
                "x 1.5, `poolwatch advise`); if use time grew, fix the slow or leaked sessions "
                "first.",
                [
                    query(
                        f"max by ({JP}) ({q.recorded('pool_utilization', POOL)})",
                        f"{legend} worst",
                    ),
                    query(q.fleet_used_ratio(POOL, JP), f"{legend} fleet"),
                ],
                unit="percentunit",
                threshold=util,
            )
        )
        .with_panel(
            graph(
                3,
                "Connection wait p99",
                "Time to obtain a connection, waiting included: p99 of the worst replica and "
                f"of the fleet. {limits(wait)} Waits with a full pool mean too few connections "
                "for the load or connections held too long (use time below).",
                [
                    query(
                        f"max by ({JP}) ({q.recorded('connection_wait_p99', POOL)})",
                        f"{legend} worst",
                    ),
                    query(q.quantile(m.DB_WAIT_TIME, POOL, JP, RATE), f"{legend} fleet"),
                ],
                unit="s",
                threshold=wait,
            )
        )
        .with_panel(
            graph(
                4,
                "Checkout timeouts",
                "Checkouts that timed out waiting (QueuePool limit reached, asyncpg "
                f"acquire timeout) per minute, all replicas. Each is a failed request. "
                f"{limits(timeouts)} Fix the cause (utilization, use time, leaks) before "
                "raising the timeout.",
                [query(f"sum by ({JP}) ({q.recorded('failed_checkouts', POOL)})", legend)],
                unit="cpm",
                threshold=timeouts,
                bars=True,
            )
        )
        .with_panel(
            graph(
                5,
                "Overflow usage (SQLAlchemy)",
                "Overflow connections open / max_overflow, worst replica. Overflow is for "
                f"bursts; held for long it means pool_size is too small. {limits(overflow)} "
                "Raise pool_size (not max_overflow) if the database allows.",
                [query(f"max by ({JP}) ({q.recorded('overflow_usage', POOL)})", legend)],
                unit="percentunit",
                threshold=overflow,
            )
        )
        .with_panel(
            graph(
                6,
                "Invalidations (SQLAlchemy)",
                "Connections invalidated per minute (soft=true: recycled on next checkout). "
                "Bursts follow database restarts or network errors; a steady rate means "
                "connections die (check pool_pre_ping, pool_recycle, server timeouts).",
                [
                    query(
                        q.per_minute(m.SA_INVALIDATIONS, POOL, f"{JP}, soft", RATE),
                        f"{legend} soft={{{{soft}}}}",
                    )
                ],
                unit="cpm",
                width=12,
            )
        )
        .with_panel(
            graph(
                7,
                "Leaked connections",
                "Connections held longer than POOLWATCH_LEAK_THRESHOLD, per minute. A leak holds "
                "a connection until the session is garbage-collected: find the code path that "
                "forgets to close its session (the agent log names the pool).",
                [query(q.per_minute(m.LEAKS, POOL, JP, RATE), legend)],
                unit="cpm",
                width=12,
            )
        )
        .with_row(row(300, "Database server (poolwatch exporter --postgres-dsn)"))
        .with_panel(
            graph(
                8,
                "Fleet connection budget",
                "Sum of the pool max of every replica of every service on a database server / "
                "the server's max_connections minus reserved connections: what the fleet may "
                f"open against what the server accepts. {limits(budget)} Above 100 % a burst "
                "or a scale-out gets 'too many clients' errors. Lower pool sizes, put PgBouncer "
                "in front, or raise max_connections. Not filtered by the variables: the budget "
                "is shared by every client of the server; pools with a custom name are not "
                "counted (the server is read from the default name host:port/database).",
                [
                    query(
                        q.recorded("fleet_connection_budget"), "{{server_address}}:{{server_port}}"
                    )
                ],
                unit="percentunit",
                threshold=budget,
                width=8,
            )
        )
        .with_panel(
            graph(
                9,
                "Server connections by state",
                "Client connections the database server holds, by state (pg_stat_activity), "
                "stacked; red dashed: max_connections minus reserved; purple dashed: the sum "
                "of every replica's pool max. Many 'idle' with few 'active' means pools are "
                "larger than the load needs; 'idle in transaction' holds a connection while "
                "the application does something else. Not filtered by the variables.",
                [
                    query(q.server_connections(), "{{server_address}}:{{server_port}} {{state}}"),
                    query(q.server_usable(), "usable max_connections"),
                    query(q.pools_max_by_server(), "pools' max, all replicas"),
                ],
                unit="short",
                stack=True,
                limit_refs=("B", "C"),
                width=8,
            )
        )
        .with_panel(
            graph(
                17,
                "Longest idle in transaction",
                "The longest time a session has been 'idle in transaction', per application: a "
                "transaction left open while the code awaits something else (an HTTP call, a "
                "leaked session). It holds a connection and row locks: find the code path by "
                "application_name and close the transaction before slow work. 0 when none. Not "
                "filtered by the variables.",
                [
                    query(
                        q.idle_in_transaction(),
                        "{{server_address}}:{{server_port}} {{application_name}}",
                    )
                ],
                unit="s",
                width=8,
            )
        )
        .with_row(row(200, "Pool $pool", repeat="pool"))
        .with_panel(
            graph(
                10,
                "Connections: used, idle, pending vs max",
                "Stacked over all replicas: connections in use, idle in the pool, and requests "
                "waiting for one; the red dashed line is the pool max. Pending above zero while "
                "used touches max is pool exhaustion.",
                [
                    query(q.gauge("sum", m.DB_COUNT, one, q.STATE), f"{{{{{q.STATE}}}}}"),
                    query(q.gauge("sum", m.DB_PENDING, one, ""), "pending"),
                    query(q.gauge("sum", m.DB_MAX, one, ""), "max"),
                ],
                unit="short",
                stack=True,
                limit_refs=("C",),
                width=24,
            )
        )
    )
    histograms = [
        (m.DB_WAIT_TIME, "Wait time", "Time to obtain a connection. Above "
         f"{unit_text(wait.warning, wait.unit)} requests visibly queue for the pool: compare "
         "use time and utilization."),
        (m.DB_USE_TIME, "Use time", "Checkout to return: how long code holds a connection. Long "
         "holds starve the pool (slow queries, network calls inside a transaction, leaks)."),
        (m.DB_CREATE_TIME, "Create time", "Time to open a new database connection. Slow connects "
         "make overflow and recycling expensive (TLS, DNS, an overloaded server): keep pool_size "
         "above the steady load so connections are reused."),
    ]  # fmt: skip
    for offset, (metric, title, meaning) in enumerate(histograms):
        board = board.with_panel(
            heatmap_panel(
                11 + offset,
                f"{title} distribution",
                f"{meaning} Heatmap of all replicas' observations per interval.",
                q.increase_buckets(metric, one, RATE),
            )
        )
    for offset, (metric, title, meaning) in enumerate(histograms):
        board = board.with_panel(
            graph(
                14 + offset,
                f"{title} p50 / p99",
                f"{meaning} Quantiles over all replicas.",
                [
                    query(q.quantile(metric, one, "job", RATE, 0.5), "{{job}} p50"),
                    query(q.quantile(metric, one, "job", RATE), "{{job}} p99"),
                ],
                unit="s",
                threshold=wait if metric is m.DB_WAIT_TIME else None,
                width=8,
            )
        )
    return board
