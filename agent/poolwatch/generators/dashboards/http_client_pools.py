"""poolwatch / HTTP client pools: aiohttp connectors and httpx pools per upstream host."""

from __future__ import annotations

from ... import metrics as m
from ...thresholds import Threshold
from .. import promql as q
from .kit import HOST, RATE, TARGET, gd, graph, heatmap_panel, limits, new_dashboard, query, row


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    client = t["http_client_utilization"]
    host = "{{job}} {{server_address}}:{{server_port}}"
    wait, httpx_wait = m.AIOHTTP_WAIT_TIME, m.HTTPX_WAIT_TIME
    # recorded per host (against limit_per_host) and for all hosts (against limit)
    per_host = q.recorded("http_client_utilization", HOST, 'server_address!=""')
    total = q.recorded("http_client_utilization", TARGET, 'server_address=""')
    return (
        new_dashboard(
            "http",
            "poolwatch / HTTP client pools",
            "aiohttp connectors and httpx pools per upstream host: connections, limits, queueing.",
            extra="host",
        )
        .with_row(row(100, "Connectors"))
        .with_panel(
            graph(
                2,
                "Connector utilization",
                "Active connections / connector limit, worst replica: aiohttp per host against "
                "limit_per_host and all hosts against limit; httpx per client against "
                f"max_connections. {limits(client)} At the limit, requests queue (see queued "
                "requests): raise the limit if the upstream can take it, or find slow upstream "
                "calls.",
                [
                    query(f"max by (job, {q.SERVER}) ({per_host})", f"{host} per host"),
                    query(f"max by (job) ({total})", "{{job}} total"),
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
                        q.gauge(
                            "sum", m.HTTP_CLIENT_OPEN, HOST, f"job, {q.SERVER}, {q.HTTP_STATE}"
                        ),
                        f"{host} {{{{{q.HTTP_STATE}}}}}",
                    ),
                    query(
                        q.gauge("sum", m.AIOHTTP_LIMIT, f'{TARGET}, scope="per_host"'),
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
                "Requests waiting for a connection because a connector (aiohttp) or pool "
                "(httpx) limit is reached, all replicas. Anything above zero adds the wait "
                "below to the request's latency: raise the limit if the upstream can take "
                "more, or speed up the calls.",
                [
                    query(q.gauge("sum", m.AIOHTTP_PENDING, TARGET), "{{job}} aiohttp"),
                    query(q.gauge("sum", m.HTTPX_PENDING, TARGET), "{{job}} httpx"),
                ],
                unit="short",
                width=8,
            )
        )
        .with_panel(
            graph(
                5,
                "Connection wait p50 / p99",
                "Time requests spent queued for a connection, over all replicas (aiohttp: "
                "requests that queued; httpx: every request, 0 when a connection was free). "
                "Near zero unless a limit is reached; a p99 near your request timeout turns "
                "queueing into errors (see connector utilization for the host).",
                [
                    query(q.quantile(wait, TARGET, "job", RATE, 0.5), "{{job}} aiohttp p50"),
                    query(q.quantile(wait, TARGET, "job", RATE), "{{job}} aiohttp p99"),
                    query(q.quantile(httpx_wait, TARGET, "job", RATE, 0.5), "{{job}} httpx p50"),
                    query(q.quantile(httpx_wait, TARGET, "job", RATE), "{{job}} httpx p99"),
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
                q.increase_buckets(wait, TARGET, RATE),
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
                        q.quantile(m.HTTP_CLIENT_DURATION, HOST, "job, server_address", RATE, 0.5),
                        "{{job}} {{server_address}} p50",
                    ),
                    query(
                        q.quantile(m.HTTP_CLIENT_DURATION, HOST, "job, server_address", RATE),
                        "{{job}} {{server_address}} p99",
                    ),
                ],
                unit="s",
                width=24,
            )
        )
    )
