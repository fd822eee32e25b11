"""poolwatch / HTTP client pools: aiohttp connectors per upstream host."""

from __future__ import annotations

from ..thresholds import Threshold
from .kit import (
    HOST,
    TARGET,
    buckets,
    connector_ratio,
    gd,
    graph,
    heatmap_panel,
    limits,
    new_dashboard,
    quantile,
    query,
    row,
)


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    client = t["http_client_utilization"]
    host = "{{job}} {{server_address}}:{{server_port}}"
    wait = "aiohttp_client_connection_wait_time_seconds"
    return (
        new_dashboard(
            "http",
            "poolwatch / HTTP client pools",
            "aiohttp connectors per upstream host: connections, limits, queueing.",
            extra="host",
        )
        .with_row(row(100, "Connectors"))
        .with_panel(
            graph(
                2,
                "Connector utilization",
                "Active connections / connector limit, worst replica: per host against "
                f"limit_per_host, and all hosts against limit. {limits(client)} At the limit, "
                "requests queue (see queued requests): raise the limit if the upstream can take "
                "it, or find slow upstream calls.",
                [
                    query(
                        "max by (job, server_address, server_port) "
                        f"({connector_ratio('per_host')})",
                        f"{host} per host",
                    ),
                    query(f"max by (job) ({connector_ratio('total')})", "{{job}} total"),
                ],
                unit="percentunit",
                threshold=client,
            )
        )
        .with_panel(
            graph(
                3,
                "Open connections by host",
                "Active (in a request) and idle (kept alive) connections per host, all "
                "replicas; the red dashed line is the fleet's limit_per_host. Many idle "
                "connections are cheap; active at the limit means queueing.",
                [
                    query(
                        "sum by (job, server_address, server_port, http_connection_state) "
                        f"(http_client_open_connections{{{HOST}}})",
                        f"{host} {{{{http_connection_state}}}}",
                    ),
                    query(
                        "sum by (job) (aiohttp_client_connection_limit"
                        f'{{{TARGET}, scope="per_host"}})',
                        "{{job}} limit per host",
                    ),
                ],
                unit="short",
                limit_refs=("B",),
            )
        )
        .with_row(row(200, "Queueing"))
        .with_panel(
            graph(
                4,
                "Queued requests",
                "Requests waiting for a connection because a connector limit is reached, all "
                "replicas. Anything above zero adds the wait below to the request's latency: "
                "raise the connector limit if the upstream can take more, or speed up the calls.",
                [query(f"sum by (job) (aiohttp_client_pending_requests{{{TARGET}}})", "{{job}}")],
                unit="short",
                width=8,
            )
        )
        .with_panel(
            graph(
                5,
                "Connection wait p50 / p99",
                "Time requests spent queued for a connection, over all replicas. Near zero "
                "unless a limit is reached; a p99 near your request timeout turns queueing into "
                "errors (see connector utilization for the host).",
                [
                    query(quantile(wait, TARGET, "job", 0.5), "{{job}} p50"),
                    query(quantile(wait, TARGET, "job"), "{{job}} p99"),
                ],
                unit="s",
                width=8,
            )
        )
        .with_panel(
            heatmap_panel(
                6,
                "Connection wait distribution",
                "Heatmap of the time requests queued for a connection, all replicas. Anything "
                "above the lowest bucket means a connector limit was reached: see connector "
                "utilization for which host.",
                buckets(wait, TARGET),
            )
        )
        .with_panel(
            graph(
                7,
                "Connection lifetime p50 / p99",
                "How long closed connections lived, per host. Short lifetimes under load mean "
                "connections are not reused (Connection: close, keep-alive timeouts, a new "
                "ClientSession per request): each request then pays a new TCP/TLS handshake.",
                [
                    query(
                        quantile(
                            "http_client_connection_duration_seconds",
                            HOST,
                            "job, server_address",
                            0.5,
                        ),
                        "{{job}} {{server_address}} p50",
                    ),
                    query(
                        quantile(
                            "http_client_connection_duration_seconds", HOST, "job, server_address"
                        ),
                        "{{job}} {{server_address}} p99",
                    ),
                ],
                unit="s",
                width=24,
            )
        )
    )
