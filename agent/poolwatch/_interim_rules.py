"""Interim alert rules for the Helm chart until the alerts generator (issue 6) is on main.

``gen_helm`` uses ``poolwatch.gen_alerts`` when it exists and this module only otherwise; delete
it when issue 6 lands. Same interface: ``rule_groups(thresholds, param=None)`` returns the
Prometheus rule groups as data, ``param(key, field)`` giving the text put in place of each table
value (field "warning", "critical" or "for"), and ``GROUP_BY``/``INHIBIT_EQUAL`` the
Alertmanager grouping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

_POOL = "db_client_connection_pool_name"
GROUP_BY = ["namespace", "service", "job", _POOL, "server_address", "server_port"]
INHIBIT_EQUAL = ["signal", *GROUP_BY]

# Worker processes of one pod are summed: one exhausted pool is one alert, not one per worker.
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
        "sum by (namespace) (db_client_connection_max) / on (namespace) max by (namespace)"
        " (postgresql_connection_max - postgresql_connection_reserved > 0)",
        "sum of pool max over all replicas / usable server connections",
    ),
}


def _table_text(thresholds: Mapping[str, Any], key: str, field: str) -> str:
    """The default ``param``: the table's own value, as the chart's Helm values print it."""
    value = getattr(thresholds[key], "for_" if field == "for" else field)
    return value if isinstance(value, str) else f"{value:g}"


def rule_groups(
    thresholds: Mapping[str, Any],
    param: Callable[[str, str], str] | None = None,
    runbook_base: str = "alerts/runbook.md",
) -> list[dict[str, Any]]:
    text = param or (lambda key, field: _table_text(thresholds, key, field))
    rules = []
    for signal, (stem, expr, what) in _SIGNALS.items():
        for severity in ("warning", "critical"):
            value = text(signal, severity)
            rules.append(
                {
                    "alert": f"{stem}{severity.capitalize()}",
                    "expr": f"{expr} > {value}",
                    "for": text(signal, "for"),
                    "labels": {"severity": severity, "signal": signal},
                    "annotations": {
                        "summary": f"{what} above {value}",
                        "description": (
                            f"{what} is {{{{ $value }}}} on {{{{ $labels.{_POOL} }}}}"
                            " ({{ $labels.namespace }}/{{ $labels.service }})"
                        ),
                        "runbook_url": f"{runbook_base}#{signal}",
                    },
                }
            )
    return [{"name": "poolwatch", "rules": rules}]
