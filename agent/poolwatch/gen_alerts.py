"""Prometheus recording and alert rules, and the Alertmanager routing, from the threshold table.

``render(thresholds)`` writes ``alerts/poolwatch.rules.yaml``, ``alerts/alertmanager.yml`` and the
promtool unit tests (``gen_alert_tests``). ``rule_groups(thresholds, param=...)`` returns the rule
groups as data, so the Helm chart's PrometheusRule is generated from the same source with its
own placeholders in place of every threshold value, ``for:`` and rate window.

Aggregation (README "Alerts"): each worker process owns its own pools and event loop, so ratios
and p99s are recorded per worker (the ``worker`` label) and an alert takes the worst worker
(``max without (worker)``): one starved worker fails its requests even when its siblings idle.
Failed checkouts are summed over workers: that is the rate the service's callers see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .thresholds import Threshold

try:
    import yaml
except ImportError as exc:  # only `poolwatch generate` needs it
    from .cli import UsageError

    raise UsageError("generating alert rules needs PyYAML: pip install 'poolwatch[cli]'") from exc

RULES_PATH = "alerts/poolwatch.rules.yaml"
ALERTMANAGER_PATH = "alerts/alertmanager.yml"
RUNBOOK_BASE = "alerts/runbook.md"  # runbook_url = RUNBOOK_BASE#<table key>
POOL = "db_client_connection_pool_name"
WORKER = "worker"
# Alertmanager: one notification per service and pool (or upstream host), whatever the number of
# workers and replicas; a critical alert inhibits the warning of its signal within that group.
GROUP_BY = ["namespace", "service", "job", POOL, "server_address", "server_port"]
INHIBIT_EQUAL = ["signal", *GROUP_BY]

# Where an alert says which thing it is about (pool or upstream host) and where it runs.
_WHERE = "{{ $labels.job }} on {{ $labels.instance }}"
_POOL = "{{ $labels.db_client_connection_pool_name }}"
_HOST = (
    "{{ with $labels.server_address }}{{ . }}:{{ $labels.server_port }}{{ else }}all hosts{{ end }}"
)
_SERVER = "{{ $labels.server_address }}:{{ $labels.server_port }}"
_PERCENT = "{{ $value | humanizePercentage }}"
_DURATION = "{{ $value | humanizeDuration }}"
_PER_MINUTE = '{{ $value | printf "%.1f" }}'


@dataclass(frozen=True)
class Signal:
    key: str  # threshold table key, also the `signal` label and the runbook section
    alert: str  # <alert>Warning / <alert>Critical
    record: str  # recording rule shared with the dashboards
    expr: str  # recording rule expression; $window is the table's rate window
    across_workers: str  # "max", "sum" or "" (the recorded series is already aggregated)
    show: str  # Prometheus template function that formats a threshold ("" = as is)
    summary: str
    description: str  # $threshold, $for, $window are filled in; $value is the alert's value


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "pool_utilization",
        "PoolUtilization",
        "poolwatch:db_client_connection_utilization:ratio",
        "sum without (db_client_connection_state) "
        '(db_client_connection_count{db_client_connection_state="used"})\n'
        "/ (db_client_connection_max > 0)",
        "max",
        "humanizePercentage",
        f"Pool {_POOL} is {_PERCENT} used",
        f"{_WHERE}: connection pool {_POOL} has {_PERCENT} of its connections checked out "
        "(busiest worker), above $threshold for $for. At 100% requests queue for a "
        "connection and then time out.",
    ),
    Signal(
        "connection_wait_p99",
        "ConnectionWait",
        "poolwatch:db_client_connection_wait_time_seconds:p99",
        "histogram_quantile(0.99, rate(db_client_connection_wait_time_seconds_bucket[$window]))"
        " >= 0",
        "max",
        "humanizeDuration",
        f"Getting a connection from pool {_POOL} takes {_DURATION} (p99)",
        f"{_WHERE}: the p99 time to get a connection from pool {_POOL} over $window is "
        f"{_DURATION} (slowest worker), above $threshold for $for. Requests wait for the pool "
        "before they reach the database.",
    ),
    Signal(
        "overflow_usage",
        "PoolOverflow",
        "poolwatch:sqlalchemy_pool_overflow_usage:ratio",
        "sqlalchemy_pool_overflow\n"
        "/ ((db_client_connection_max - db_client_connection_idle_max) > 0)",
        "max",
        "humanizePercentage",
        f"Pool {_POOL} uses {_PERCENT} of its max_overflow",
        f"{_WHERE}: SQLAlchemy pool {_POOL} has {_PERCENT} of its max_overflow connections "
        "open (busiest worker), above $threshold for $for: pool_size is too small for the "
        "steady load, and overflow connections are opened and closed again and again.",
    ),
    Signal(
        "failed_checkouts",
        "CheckoutTimeouts",
        "poolwatch:db_client_connection_timeouts:per_minute",
        "rate(db_client_connection_timeouts_total[$window]) * 60",
        "sum",
        "",
        f"Checkouts from pool {_POOL} time out: {_PER_MINUTE} per minute",
        f"{_WHERE}: {_PER_MINUTE} checkouts per minute from pool {_POOL} gave up waiting for a "
        "connection (all workers, over $window), above $threshold per minute for $for. Each "
        "one is a failed request.",
    ),
    Signal(
        "loop_lag_p99",
        "EventLoopLag",
        "poolwatch:asyncio_event_loop_lag_seconds:p99",
        "histogram_quantile(0.99, rate(asyncio_event_loop_lag_seconds_bucket[$window])) >= 0",
        "max",
        "humanizeDuration",
        "Event loop of {{ $labels.job }} lags " + _DURATION + " (p99)",
        f"{_WHERE}: the event loop's p99 lag over $window is {_DURATION} (slowest worker), "
        "above $threshold for $for. Something blocks the loop and every request of that "
        "worker waits; asyncio_event_loop_blocks_total names the code (label culprit).",
    ),
    Signal(
        "http_client_utilization",
        "HttpClientPool",
        "poolwatch:http_client_connection_utilization:ratio",
        # per upstream host against limit_per_host where one is set, and the connector's total
        # against its limit; a limit of 0 is aiohttp's "unlimited" and is left out
        "sum without (http_connection_state, url_scheme) "
        '(http_client_open_connections{http_connection_state="active"})\n'
        "/ ignoring (server_address, server_port) group_left\n"
        '  max without (scope) (aiohttp_client_connection_limit{scope="per_host"} > 0)\n'
        "or\n"
        "sum without (http_connection_state, url_scheme, server_address, server_port) "
        '(http_client_open_connections{http_connection_state="active"})\n'
        '/ max without (scope) (aiohttp_client_connection_limit{scope="total"} > 0)',
        "max",
        "humanizePercentage",
        f"aiohttp connections of {{{{ $labels.job }}}} to {_HOST} are {_PERCENT} used",
        f"{_WHERE}: the aiohttp connector uses {_PERCENT} of its connection limit for {_HOST} "
        "(busiest worker), above $threshold for $for. At 100% outgoing requests queue for a "
        "connection.",
    ),
    Signal(
        "fleet_connection_budget",
        "FleetConnectionBudget",
        "poolwatch:db_client_connection_fleet_budget:ratio",
        # Every pool of every replica and worker against the capacity of its server, reported
        # by `poolwatch exporter --postgres-dsn` (any of its replicas). The server is read from
        # the default pool name host:port/database, as the dashboards do; a pool given its own
        # name cannot be matched to a server and is left out.
        "sum by (server_address, server_port) (\n"
        f"  label_replace(label_replace(db_client_connection_max,\n"
        f'    "server_address", "$1", "{POOL}", "(.+):([0-9]+)/.*"),\n'
        f'    "server_port", "$2", "{POOL}", "(.+):([0-9]+)/.*")\n'
        ")\n"
        "/ on (server_address, server_port)\n"
        "max by (server_address, server_port) "
        "(postgresql_connection_max - postgresql_connection_reserved > 0)",
        "",
        "humanizePercentage",
        f"Pools using {_SERVER} may open {_PERCENT} of the connections it allows",
        f"The connection maxima of all pools using PostgreSQL {_SERVER}, summed over every "
        f"replica and worker, are {_PERCENT} of its max_connections minus its reserved "
        "connections, above $threshold for $for. Under full load new connections fail with "
        '"too many clients".',
    ),
)

Param = Callable[[str, str], str]


def value_text(threshold: Threshold, field: str) -> str:
    """The default ``param``: the table's value of ``field`` (warning, critical, for, window)."""
    if field in ("for", "window"):
        return str(threshold.for_ if field == "for" else threshold.window)
    return f"{getattr(threshold, field):.10g}"


def rule_groups(
    thresholds: Mapping[str, Threshold],
    param: Param | None = None,
    runbook_base: str = RUNBOOK_BASE,
) -> list[dict[str, Any]]:
    """The rule groups as data (the ``groups:`` list of a Prometheus rule file).

    ``param(key, field)`` gives the text put in place of each table value, ``field`` being
    "warning", "critical", "for" or "window" of signal ``key``; by default the table's values.
    """
    text = param or (lambda key, field: value_text(thresholds[key], field))
    records, alerts = [], []
    for signal in SIGNALS:
        window = text(signal.key, "window") if thresholds[signal.key].window else ""
        records.append({"record": signal.record, "expr": signal.expr.replace("$window", window)})
        aggregated = signal.record
        if signal.across_workers:
            aggregated = f"{signal.across_workers} without ({WORKER}) ({signal.record})"
        for severity in ("warning", "critical"):
            value, for_ = text(signal.key, severity), text(signal.key, "for")
            shown = f"{{{{ {value} | {signal.show} }}}}" if signal.show else value
            description = signal.description.replace("$threshold", shown)
            alerts.append(
                {
                    "alert": signal.alert + severity.capitalize(),
                    "expr": f"{aggregated} > {value}",
                    "for": for_,
                    "labels": {"severity": severity, "signal": signal.key},
                    "annotations": {
                        "summary": signal.summary,
                        "description": description.replace("$for", for_).replace("$window", window),
                        "runbook_url": f"{runbook_base}#{signal.key}",
                    },
                }
            )
    return [{"name": "poolwatch", "rules": records + alerts}]


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line expressions; keys in the order given."""


_Dumper.add_representer(
    str,
    lambda dumper, data: dumper.represent_scalar(
        "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None
    ),
)


def to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


HEADER = (
    "# Generated by `poolwatch generate` from poolwatch/thresholds.toml: do not edit. Change\n"
    "# thresholds with `poolwatch generate --overrides FILE`; see alerts/runbook.md.\n"
)


def render_rules(thresholds: Mapping[str, Threshold]) -> str:
    return HEADER + to_yaml({"groups": rule_groups(thresholds)})


def render(thresholds: Mapping[str, Threshold]) -> dict[str, str]:
    from . import gen_alert_tests

    return {
        RULES_PATH: render_rules(thresholds),
        ALERTMANAGER_PATH: render_alertmanager(),
        **gen_alert_tests.render(thresholds),
    }


def render_alertmanager() -> str:
    return (
        _ALERTMANAGER.replace("@GROUP_BY@", ", ".join(GROUP_BY))
        .replace("@EQUAL@", ", ".join(INHIBIT_EQUAL))
        .replace("@POOL@", POOL)
    )


# The routing tree and receivers (README "Alerts", runbook "Routing, repeat and resolve").
# Receivers read their secrets from files (mounted from a Kubernetes Secret): the routing key
# and the webhook URL are never in this file.
_ALERTMANAGER = r"""# Alertmanager routing for the poolwatch alerts.
# Generated by `poolwatch generate`: do not edit; see alerts/runbook.md "Routing, repeat and
# resolve".
# Standalone: use as is, with the two secret files below. With your own Alertmanager: copy the
# route under `routes:`, the inhibit rule and the two receivers into your configuration.
route:
  receiver: chat
  routes:
    # Every poolwatch alert carries `signal` (its threshold table key).
    - matchers: ['signal=~".+"']
      receiver: chat
      # One notification per service and pool (or upstream host): every worker and replica of
      # one exhausted pool lands in one group, hence one page.
      group_by: [@GROUP_BY@]
      group_wait: 30s       # gather the alerts of one incident before the first notification
      group_interval: 5m    # a new or resolved alert in a notified group is sent after this
      repeat_interval: 4h   # a group still firing is sent again after this
      routes:
        - matchers: ['severity="critical"']
          receiver: pager
          repeat_interval: 1h
        - matchers: ['severity="warning"']
          receiver: chat
          repeat_interval: 12h

inhibit_rules:
  # A critical alert mutes its warning twin (same signal, same service and pool or host).
  - source_matchers: ['severity="critical"', 'signal=~".+"']
    target_matchers: ['severity="warning"']
    equal: [@EQUAL@]

receivers:
  - name: pager
    pagerduty_configs:
      - routing_key_file: /etc/alertmanager/secrets/poolwatch/pagerduty-routing-key
        send_resolved: true
        description: >-
          [{{ .Status | toUpper }}] {{ (index .Alerts 0).Annotations.summary }}
          {{- if gt (len .Alerts) 1 }} ({{ len .Alerts }} alerts){{ end }}
        links:
          - href: '{{ (index .Alerts 0).Annotations.runbook_url }}'
            text: runbook
        details:
          pool: '{{ .GroupLabels.@POOL@ }}'
          service: '{{ .GroupLabels.service }}'
          job: '{{ .GroupLabels.job }}'
          namespace: '{{ .GroupLabels.namespace }}'
          runbook_url: '{{ (index .Alerts 0).Annotations.runbook_url }}'
  - name: chat
    slack_configs:
      - api_url_file: /etc/alertmanager/secrets/poolwatch/slack-webhook-url
        send_resolved: true
        title: '[{{ .Status | toUpper }}] {{ (index .Alerts 0).Annotations.summary }}'
        title_link: '{{ (index .Alerts 0).Annotations.runbook_url }}'
        text: >-
          {{ range .Alerts }}*{{ .Labels.alertname }}* {{ .Annotations.description }}
          {{ .Annotations.runbook_url }}{{ "\n" }}{{ end }}
"""
