"""Interim alert rules for the Helm chart until the alerts generator (issue 6) is on main.

``gen_helm`` uses ``poolwatch.gen_alerts.rule_groups`` when it exists and this module only
otherwise; delete it when issue 6 lands. Same interface: ``rule_groups(thresholds)`` returns
Prometheus rule groups as data, formatting each threshold field into the text (never computing
with it), so the chart can pass placeholders that become Helm values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Worker processes of one pod are summed: one exhausted pool is one alert, not one per worker.
_POOL = "db_client_connection_pool_name"
_SIGNALS: dict[str, tuple[str, str, str]] = {
    # signal: (alert name stem, expression before "> threshold", what it measures)
    "pool_utilization": (
        "PoolUtilization",
        "sum without (worker, db_client_connection_state) "
        '(db_client_connection_count{db_client_connection_state="used"})'
        " / sum without (worker) (db_client_connection_max)",
        "used / max connections",
    ),
    "connection_wait_p99": (
        "ConnectionWait",
        "histogram_quantile(0.99, sum without (worker) "
        "(rate(db_client_connection_wait_time_seconds_bucket[5m])))",
        "p99 connection wait time (seconds)",
    ),
    "overflow_usage": (
        "PoolOverflow",
        "sum without (worker) (sqlalchemy_pool_overflow) / sum without (worker) "
        "(db_client_connection_max - db_client_connection_idle_max)",
        "overflow connections in use / max_overflow",
    ),
    "failed_checkouts": (
        "CheckoutTimeouts",
        "sum without (worker) (rate(db_client_connection_timeouts_total[5m])) * 60",
        "checkout timeouts per minute",
    ),
    "loop_lag_p99": (
        "EventLoopLag",
        "histogram_quantile(0.99, rate(asyncio_event_loop_lag_seconds_bucket[5m]))",
        "p99 event-loop lag (seconds)",
    ),
    "http_client_utilization": (
        "HttpClientPool",
        "sum without (worker, http_connection_state, server_address, server_port, url_scheme) "
        '(http_client_open_connections{http_connection_state="active"})'
        ' / sum without (worker, scope) (aiohttp_client_connection_limit{scope="total"})',
        "active HTTP client connections / connector limit",
    ),
    "fleet_connection_budget": (
        "FleetConnectionBudget",
        "sum(db_client_connection_max) / scalar(max(poolwatch_postgres_max_connections)"
        " - max(poolwatch_postgres_reserved_connections))",
        "sum of pool max over all replicas / usable server connections",
    ),
}


def rule_groups(thresholds: Mapping[str, Any]) -> list[dict[str, Any]]:
    rules = []
    for signal, (stem, expr, what) in _SIGNALS.items():
        threshold = thresholds[signal]
        for severity in ("warning", "critical"):
            rules.append(
                {
                    "alert": f"{stem}{severity.capitalize()}",
                    "expr": f"{expr} > {getattr(threshold, severity)}",
                    "for": f"{threshold.for_}",
                    "labels": {"severity": severity, "signal": signal},
                    "annotations": {
                        "summary": f"{what} above {getattr(threshold, severity)}",
                        "description": (
                            f"{what} is {{{{ $value }}}} on {{{{ $labels.{_POOL} }}}}"
                            " ({{ $labels.namespace }}/{{ $labels.service }})"
                        ),
                        "runbook_url": f"alerts/runbook.md#{signal.replace('_', '-')}",
                    },
                }
            )
    return [{"name": "poolwatch", "rules": rules}]
