"""Prometheus recording and alert rules from the threshold table.

``render(table)`` writes ``alerts/poolwatch.rules.yaml``. ``rule_groups(table, param=...)`` returns
the rule groups as data, so the Helm chart's PrometheusRule is generated from the same source with
its own placeholders in place of every threshold value, ``for:``, rate window and the selector.
The expressions are ``promql.py``'s; here are the alerts' names, aggregation and texts.

Aggregation (README "Alerts"): each worker process owns its own pools and event loop, so ratios
and p99s are recorded per worker (the ``worker`` label) and an alert takes the worst worker
(``max without (worker)``): one starved worker fails its requests even when its siblings idle.
Failed checkouts are summed over workers: that is the rate the service's callers see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import metrics as m
from ..thresholds import Threshold
from . import GeneratorError, promql
from .promql import POOL, WORKER

try:
    import yaml
except ImportError as exc:  # only `poolwatch generate` needs it
    raise GeneratorError(
        "generating alert rules needs PyYAML: pip install 'poolwatch[cli]'"
    ) from exc

RULES_PATH = "alerts/poolwatch.rules.yaml"
RUNBOOK_BASE = "alerts/runbook.md"  # runbook_url = RUNBOOK_BASE#<table key>

# Where an alert says which thing it is about (pool or upstream host) and where it runs.
_WHERE = "{{ $labels.job }} on {{ $labels.instance }}"
_POOL = f"{{{{ $labels.{POOL} }}}}"
_HOST = (
    "{{ with $labels.server_address }}{{ . }}:{{ $labels.server_port }}{{ else }}all hosts{{ end }}"
)
_SERVER = "{{ $labels.server_address }}:{{ $labels.server_port }}"
_PERCENT = "{{ $value | humanizePercentage }}"
_DURATION = "{{ $value | humanizeDuration }}"
_PER_MINUTE = '{{ $value | printf "%.1f" }}'
_COUNT = '{{ $value | printf "%.0f" }}'


@dataclass(frozen=True)
class Signal:
    key: str  # threshold table key, also the `signal` label and the runbook section
    alert: str  # <alert>Warning / <alert>Critical
    across_workers: str  # "max", "sum" or "" (the recorded series is already aggregated)
    show: str  # Prometheus template function that formats a threshold ("" = as is)
    summary: str
    description: str  # $threshold, $for, $window are filled in; $value is the alert's value

    @property
    def record(self) -> str:
        """The recording rule's series, which the dashboards read too."""
        return promql.RECORDS[self.key]

    @property
    def expr(self) -> str:
        """The recording rule's expression; $window is the table's rate window."""
        return promql.SIGNALS[self.key]("$window")


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "pool_utilization",
        "PoolUtilization",
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
        "max",
        "humanizePercentage",
        f"HTTP client connections of {{{{ $labels.job }}}} to {_HOST} are {_PERCENT} used",
        f"{_WHERE}: the aiohttp connector (or, with an httpx_client_name label, that httpx "
        f"client's pool) uses {_PERCENT} of its connection limit for {_HOST} "
        "(busiest worker), above $threshold for $for. At 100% outgoing requests queue for a "
        "connection.",
    ),
    Signal(
        "fleet_connection_budget",
        "FleetConnectionBudget",
        "",
        "humanizePercentage",
        f"Pools using {_SERVER} may open {_PERCENT} of the connections it allows",
        f"The connection maxima of all pools using PostgreSQL {_SERVER}, summed over every "
        f"replica and worker, are {_PERCENT} of its max_connections minus its reserved "
        "connections, above $threshold for $for. Under full load new connections fail with "
        '"too many clients".',
    ),
)

# Diagnosis: one warning alert per anti-pattern kind (``poolwatch_antipatterns_total``). No
# threshold: one occurrence is a finding. It fires when the kind's count grew over the window
# (the difference with the count WINDOW ago, or since the process started) and resolves when the
# code has not done it for that long. The kind is the runbook section; culprits are in the
# counter's ``culprit`` label and in the app's log line.
ANTIPATTERN_WINDOW = "10m"
ANTIPATTERN_ALERTS: dict[str, tuple[str, str]] = {  # kind -> (alert, what the code does)
    "engine_per_request": (
        "AntipatternEnginePerRequest",
        "creates a database engine or pool per request",
    ),
    "client_per_request": (
        "AntipatternClientPerRequest",
        "creates an HTTP client session per request",
    ),
    "sync_db_on_loop": (
        "AntipatternSyncDbOnLoop",
        "runs synchronous database queries on the event loop",
    ),
    "n_plus_one": (
        "AntipatternNPlusOne",
        "runs the same statement N times in one request (N+1)",
    ),
    "shared_async_session": (
        "AntipatternSharedAsyncSession",
        "uses one AsyncSession from two tasks at once",
    ),
    "swallowed_cancel": (
        "AntipatternSwallowedCancel",
        "swallows CancelledError in cancelled tasks",
    ),
    "unclosed_pool": (
        "AntipatternUnclosedPool",
        "leaves pools or client sessions open at shutdown",
    ),
}


def antipattern_expr(kind: str) -> str:
    selected = promql.series(m.ANTIPATTERNS, 'kind="' + kind + '"')
    count = f"sum without ({WORKER}, culprit) ({selected})"
    before = f"sum without ({WORKER}, culprit) ({selected} offset {ANTIPATTERN_WINDOW})"
    return f"{count}\n- ({before} or {count} * 0)\n> 0"


def antipattern_rules(runbook_base: str, selector: str) -> list[dict[str, Any]]:
    rules = []
    for kind, (alert, does) in ANTIPATTERN_ALERTS.items():
        rules.append(
            {
                "alert": alert,
                "expr": promql.with_selector(antipattern_expr(kind), selector),
                "labels": {"severity": "warning", "signal": kind},
                "annotations": {
                    "summary": f"{{{{ $labels.job }}}} {does}",
                    "description": (
                        f"{_WHERE}: the app {does} ({kind}, {_COUNT} times in the last "
                        f"{ANTIPATTERN_WINDOW}). The app's log names the code (one line per "
                        f'place, "poolwatch: {kind}:"), as does the culprit label of '
                        "poolwatch_antipatterns_total."
                    ),
                    "runbook_url": f"{runbook_base}#{kind}",
                },
            }
        )
    return rules


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
    selector: str | None = None,
) -> list[dict[str, Any]]:
    """The rule groups as data (the ``groups:`` list of a Prometheus rule file).

    ``param(key, field)`` gives the text put in place of each table value, ``field`` being
    "warning", "critical", "for" or "window" of signal ``key``; by default the table's values.
    ``selector`` goes into every series selector: by default the table's; ``promql.SELECTOR``
    leaves the marks for the Helm chart.
    """
    text = param or (lambda key, field: value_text(thresholds[key], field))
    if selector is None:
        selector = getattr(thresholds, "selector", "")
    records, alerts = [], []
    for signal in SIGNALS:
        window = text(signal.key, "window") if thresholds[signal.key].window else ""
        expr = promql.with_selector(signal.expr.replace("$window", window), selector)
        records.append({"record": signal.record, "expr": expr})
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
    alerts += antipattern_rules(runbook_base, selector)
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
    "# thresholds or the selector with `poolwatch generate --overrides FILE`; see\n"
    "# alerts/runbook.md. The dashboards read the recording rules: load this file for them too.\n"
)


def render_rules(thresholds: Mapping[str, Threshold]) -> str:
    return HEADER + to_yaml({"groups": rule_groups(thresholds)})


def render(table: Mapping[str, Threshold]) -> dict[str, str]:
    return {RULES_PATH: render_rules(table)}
