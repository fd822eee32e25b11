"""promtool unit tests of the generated rules, derived from the same threshold table.

For every alert: input series that fire it, checked one evaluation before and at the moment it
must fire with its exact labels and annotations, and healthy series that must not fire it (just
under the threshold for longer than ``for:``, and a spike above it shorter than ``for:``).
The expected values are computed here from how the series are built (see ``_value``), so a wrong
expression, aggregation, window or template makes ``promtool test rules`` fail.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .. import metrics as m
from ..metrics import BUCKETS
from ..thresholds import Threshold, duration_seconds
from . import GeneratorError
from .promql import HTTP_STATE, POOL, SCHEME, STATE, WORKER
from .rules import ANTIPATTERN_ALERTS, RULES_PATH, SIGNALS, Signal, rule_groups, to_yaml

TESTS_PATH = "tests/alerts/poolwatch_test.yaml"
TARGET = {"job": "orders", "instance": "10.0.0.7:9464", "namespace": "shop", "service": "orders"}
SERVER = {"server_address": "db.shop", "server_port": "5432"}
POOL_NAME = "db.shop:5432/orders"  # the default name: server_address:server_port/database
HOST = {"server_address": "payments.shop", "server_port": "443"}
SCALE = 1000  # gauges are n / SCALE, so a value just over a threshold is one more connection
SLOW, FAST = 2, 98  # histogram observations per step: 2 % slow puts the p99 above the threshold

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def ms(duration: str) -> int:
    return round(duration_seconds(duration) * 1000)


def dur(millis: int) -> str:
    """A Prometheus duration: 90000 -> "1m30s"."""
    out = ""
    for unit in ("h", "m", "s", "ms"):
        count, millis = divmod(millis, _UNITS[unit])
        out += f"{count}{unit}" if count else ""
    return out or "0s"


# --- Prometheus template functions, as Go formats them (for the expected annotations) ---
def humanize_percentage(value: float) -> str:
    return f"{value * 100:.4g}%"


def humanize_duration(value: float) -> str:
    if value >= 60 or value == 0:
        raise ValueError("tests only produce durations in (0 s, 60 s)")
    if value >= 1:
        return f"{value:.4g}s"
    prefix = ""
    for p in ("m", "u", "n"):
        if value >= 1:
            break
        prefix, value = p, value * 1000
    return f"{value:.4g}{prefix}s"


def _show(signal: Signal, value: float) -> str:
    if signal.show == "humanizePercentage":
        return humanize_percentage(value)
    if signal.show == "humanizeDuration":
        return humanize_duration(value)
    return f"{value:.1f}"


def _kind(signal: Signal) -> str:
    if "histogram_quantile" in signal.expr:
        return "histogram"
    return "counter" if "rate(" in signal.expr else "gauge"


def _buckets(t: Threshold) -> list[float]:
    return sorted({*BUCKETS, t.warning, t.critical})


def _split(level: float, t: Threshold) -> tuple[float, float, float]:
    """Histogram level ``x``: FAST observations at or below ``x``, SLOW in the bucket above it
    (so the p99 is above ``x``); a negative level (-x) puts only 1 in 200 above x (p99 below)."""
    buckets = _buckets(t)
    x = abs(level)
    below = max(b for b in buckets if b <= x)
    above = min((b for b in buckets if b > x), default=math.inf)
    return below, above, (SLOW if level > 0 else 0.5)


def _p99(level: float, t: Threshold) -> float:
    """histogram_quantile(0.99, ...) over steps of one histogram level (Prometheus' algorithm)."""
    below, above, slow = _split(level, t)
    lower = max((b for b in _buckets(t) if b < below), default=0.0)
    total = FAST + slow
    rank = 0.99 * total
    if rank <= FAST:  # in the bucket (lower, below]
        return lower + (below - lower) * (rank / FAST)
    return below + (above - below) * ((rank - FAST) / slow)


def _value(signal: Signal, t: Threshold, level: float, at: int, window: int) -> float:
    """The alert's value at evaluation time ``at`` (ms) of series at one constant ``level``
    from time 0. Counters start at 0, so rate() ramps up linearly until the window is full."""
    kind = _kind(signal)
    if kind == "gauge":
        return round(level * SCALE) / SCALE
    if kind == "counter":
        return level * min(at, window) / window
    return _p99(level, t)


def _gauge(levels: list[tuple[float, int]], parts: int = 1, part: int = 0) -> str:
    """promtool values of a gauge at ``levels`` [(level, steps)]; ``part`` of ``parts`` of it."""
    out = []
    for level, n in levels:
        whole = round(level * SCALE)
        out.append(f"{whole // parts + (part < whole % parts)}x{n - 1}")
    return " ".join(out)


def _counter(increments: list[tuple[float, int]]) -> str:
    """promtool values of a counter at 0 growing by ``inc`` per step for ``n`` steps, ..."""
    out, value = ["0"], 0.0
    for inc, n in increments:
        out.append(f"{value + inc:.10g}+{inc:.10g}x{n - 1}" if inc else f"{value:.10g}x{n - 1}")
        value += inc * n
    return " ".join(out)


Series = tuple[str, dict[str, str], str]  # name, labels, promtool values


def _s(name: str, labels: dict[str, str], values: str) -> Series:
    return name, labels, values


def _series(signal: Signal, t: Threshold, steps, step_ms: int, labels: dict[str, str]) -> list:
    """``_raw_series`` in promtool's notation, with ``labels`` (the selector's) on each."""
    out = []
    for name, own, values in _raw_series(signal, t, steps, step_ms):
        body = ", ".join(f'{k}="{_escape(v)}"' for k, v in {**own, **labels}.items())
        out.append({"series": f"{name}{{{body}}}", "values": values})
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _raw_series(signal: Signal, t: Threshold, steps: list[tuple[float, int]], step_ms: int):
    """Input series: worker 1 follows ``steps`` [(level, count)], worker 2 stays healthy."""
    key, n = signal.key, sum(count for _, count in steps)
    pool = {**TARGET, POOL: POOL_NAME}
    bad, good = {**pool, WORKER: "1"}, {**pool, WORKER: "2"}
    if key == "pool_utilization":
        used = {STATE: "used"}
        return [
            _s(m.DB_COUNT.sample(), {**bad, **used}, _gauge(steps)),
            _s(m.DB_COUNT.sample(), {**good, **used}, _gauge([(0.1, n)])),
            *(_s(m.DB_MAX.sample(), w, f"{SCALE}x{n}") for w in (bad, good)),
        ]
    if key == "overflow_usage":  # max_overflow = max - idle_max = SCALE
        return [
            _s(m.SA_OVERFLOW.sample(), bad, _gauge(steps)),
            _s(m.SA_OVERFLOW.sample(), good, _gauge([(0.0, n)])),
            *(_s(m.DB_MAX.sample(), w, f"{SCALE + 5}x{n}") for w in (bad, good)),
            *(_s(m.DB_IDLE_MAX.sample(), w, f"5x{n}") for w in (bad, good)),
        ]
    if key == "http_client_utilization":
        # worker 1 has a per-host limit (SCALE), worker 2 only a total limit (SCALE)
        bad, good = {**TARGET, WORKER: "1"}, {**TARGET, WORKER: "2"}
        active = {**HOST, SCHEME: "https", HTTP_STATE: "active"}
        idle = {**active, HTTP_STATE: "idle"}
        limit = m.AIOHTTP_LIMIT.sample()
        return [
            _s(m.HTTP_CLIENT_OPEN.sample(), {**bad, **active}, _gauge(steps)),
            _s(m.HTTP_CLIENT_OPEN.sample(), {**bad, **idle}, f"3x{n}"),
            _s(limit, {**bad, "scope": "per_host"}, f"{SCALE}x{n}"),
            _s(limit, {**bad, "scope": "total"}, f"0x{n}"),
            _s(m.HTTP_CLIENT_OPEN.sample(), {**good, **active}, f"10x{n}"),
            _s(limit, {**good, "scope": "per_host"}, f"0x{n}"),
            _s(limit, {**good, "scope": "total"}, f"{SCALE}x{n}"),
        ]
    if key == "fleet_connection_budget":
        # pool maxima of 2 replicas x 2 workers add up to the level; a pool on another server
        # and one with its own name do not count; 2 exporter replicas see the server
        out = []
        for part, (replica, worker) in enumerate((r, w) for r in "ab" for w in "12"):
            labels = {**pool, "instance": f"orders-{replica}:9464", WORKER: worker}
            out.append(_s(m.DB_MAX.sample(), labels, _gauge(steps, 4, part)))
        for name in ("db.other:5432/orders", "orders-cache"):
            out.append(_s(m.DB_MAX.sample(), {**bad, POOL: name}, f"{SCALE}x{n}"))
        for replica in "xy":
            exporter = {"job": "exporter", "instance": f"exporter-{replica}:9464", **SERVER}
            out.append(_s(m.PG_CONNECTION_MAX.sample(), exporter, f"{SCALE + 3}x{n}"))
            out.append(_s(m.PG_CONNECTION_RESERVED.sample(), exporter, f"3x{n}"))
        return out
    if key == "failed_checkouts":  # split over two workers: only their sum is over
        half = _counter([(level * step_ms / 60_000 / 2, count) for level, count in steps])
        name = m.DB_TIMEOUTS.sample()
        return [_s(name, bad, half), _s(name, good, half)]
    # histograms: connection wait time (per pool), event-loop lag (per process)
    name = m.DB_WAIT_TIME.sample("bucket")
    if key == "loop_lag_p99":
        name = m.LOOP_LAG.sample("bucket")
        bad, good = {**TARGET, WORKER: "1"}, {**TARGET, WORKER: "2"}
    out = []
    for le in [*_buckets(t), math.inf]:
        increments: list[tuple[float, int]] = []
        for level, count in steps:
            if not level:  # no observations
                increments.append((0, count))
                continue
            below, above, slow = _split(level, t)
            increments.append(((FAST if le >= below else 0) + (slow if le >= above else 0), count))
        le_text = "+Inf" if le == math.inf else f"{le:g}"
        out.append(_s(name, {**bad, "le": le_text}, _counter(increments)))
        fast = FAST if le >= BUCKETS[0] else 0
        out.append(_s(name, {**good, "le": le_text}, _counter([(fast, n)])))
    return out


def _alert_labels(signal: Signal, severity: str, selected: dict[str, str]) -> dict[str, str]:
    if signal.key == "fleet_connection_budget":  # summed by server: no label of the apps'
        where = dict(SERVER)
    elif signal.key == "http_client_utilization":
        where = {**TARGET, **HOST, **selected}
    elif signal.key == "loop_lag_p99":
        where = {**TARGET, **selected}
    else:
        where = {**TARGET, POOL: POOL_NAME, **selected}
    return {**where, "severity": severity, "signal": signal.key}


def _render_template(text: str, labels: dict[str, str], shown: str) -> str:
    """Fill in the few Prometheus template constructs the generated annotations use."""
    text = re.sub(r"\{\{ \$value \| [^}]+ \}\}", shown, text)
    text = re.sub(
        r"\{\{ with \$labels\.(\w+) \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}|"
        r"\{\{ with \$labels\.(\w+) \}\}(.*?)\{\{ end \}\}",
        lambda m: (
            (m[2] if labels.get(m[1]) else m[3]).replace("{{ . }}", labels.get(m[1], ""))
            if m[1]
            else (m[5] if labels.get(m[4]) else "").replace("{{ . }}", labels.get(m[4], ""))
        ),
        text,
    )
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
    text = re.sub(
        r"\{\{ ([0-9.e+-]+) \| (\w+) \}\}",
        lambda m: (
            humanize_percentage(float(m[1]))
            if m[2] == "humanizePercentage"
            else humanize_duration(float(m[1]))
        ),
        text,
    )
    return text


def _expected(signal: Signal, rule: dict, severity: str, value: float, selected: dict) -> dict:
    labels = _alert_labels(signal, severity, selected)
    shown = _show(signal, value)
    return {
        "exp_labels": labels,
        "exp_annotations": {
            k: _render_template(v, labels, shown) for k, v in rule["annotations"].items()
        },
    }


def _signal_tests(
    signal: Signal,
    t: Threshold,
    rules: dict[str, dict],
    step: int,
    selected: dict[str, str],
    outside: dict[str, str] | None,
) -> list:
    """Firing, quiet and spike tests of one signal's alerts, on series carrying ``selected``
    labels; with ``outside`` (labels the selector does not select) also another service whose
    series are over critical, which must stay quiet."""
    kind = _kind(signal)
    hold = ms(t.for_)
    window = ms(t.window) if t.window else 0
    first = 0 if kind == "gauge" else step  # rate() needs two samples

    def just_over(threshold: float) -> float:
        if kind == "gauge":  # one connection more
            return (math.floor(threshold * SCALE + 1e-9) + 1) / SCALE
        if kind == "histogram":  # 2 % of the observations above it
            return threshold
        level = threshold * 1.2  # per minute, nudged off evaluations that land on a threshold
        while any(
            math.isclose(_value(signal, t, level, at, window), x, rel_tol=1e-6)
            for at in range(step, window + step, step)
            for x in (t.warning, t.critical)
        ):
            level *= 1.01
        return level

    levels = {"warning": just_over(t.warning), "critical": just_over(t.critical)}
    names = {s: f"{signal.alert}{s.capitalize()}" for s in ("warning", "critical")}
    tests = []

    def active_at(level: float, threshold: float) -> int | None:
        at = first
        while at <= first + window + hold + 10 * step:
            if _value(signal, t, level, at, window) > threshold:
                return at
            at += step
        return None

    for target, level in levels.items():
        start = active_at(level, getattr(t, target))
        assert start is not None, f"{signal.key} {target}: the test level never crosses"
        fire = start + hold
        checks = []
        for at in (fire - step, fire):
            for severity, name in names.items():
                began = active_at(level, getattr(t, severity))
                firing = began is not None and began + hold <= at
                value = _value(signal, t, level, at, window)
                checks.append(
                    {
                        "eval_time": dur(at),
                        "alertname": name,
                        "exp_alerts": [_expected(signal, rules[name], severity, value, selected)]
                        if firing
                        else [],
                    }
                )
        tests.append(
            {
                "name": f"{signal.key}: just over {target} fires {names[target]} after {t.for_}",
                "interval": dur(step),
                "input_series": _series(signal, t, [(level, fire // step + 3)], step, selected),
                "alert_rule_test": checks,
            }
        )

    quiet_until = hold + window + 4 * step
    under = {
        "gauge": (math.ceil(t.warning * SCALE - 1e-9) - 1) / SCALE,  # one connection less
        "counter": t.warning * 0.9,
        "histogram": -t.warning,  # 0.5 % of the observations above it
    }
    tests.append(
        {
            "name": f"{signal.key}: just under warning for longer than {t.for_} stays quiet",
            "interval": dur(step),
            "input_series": _series(
                signal, t, [(under[kind], quiet_until // step + 2)], step, selected
            ),
            "alert_rule_test": [
                {"eval_time": dur(at), "alertname": name, "exp_alerts": []}
                for at in (hold, quiet_until)
                for name in names.values()
            ],
        }
    )
    # A spike above critical that lasts shorter than `for:`. A rate over `window` stays up for
    # `window` after the spike ends, so the spike must be shorter than `for` minus the window.
    spike_steps = (hold - step) // step if kind == "gauge" else (hold - window - step) // step
    if spike_steps >= 1:
        after = 0.0 if kind != "gauge" else 0.1 * t.warning
        steps = [(levels["critical"], spike_steps), (after, (hold + window) // step + 4)]
        end = sum(n for _, n in steps) * step - step
        tests.append(
            {
                "name": f"{signal.key}: a spike over critical shorter than {t.for_} stays quiet",
                "interval": dur(step),
                "input_series": _series(signal, t, steps, step, selected),
                "alert_rule_test": [
                    {"eval_time": dur(at), "alertname": name, "exp_alerts": []}
                    for at in (hold, spike_steps * step + window, end)
                    for name in names.values()
                ],
            }
        )
    if outside is not None:
        over = [(levels["critical"], quiet_until // step + 2)]
        tests.append(
            {
                "name": f"{signal.key}: another service over critical is not selected: quiet",
                "interval": dur(step),
                "input_series": _series(signal, t, over, step, outside),
                "alert_rule_test": [
                    {"eval_time": dur(at), "alertname": name, "exp_alerts": []}
                    for at in (hold, quiet_until)
                    for name in names.values()
                ],
            }
        )
    return tests


# --- labels that the selector selects, and labels it does not --------------------------------
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selector_labels(selector: str) -> tuple[dict[str, str], dict[str, str] | None]:
    """Labels that put a test series inside the selector, and labels that put it outside
    (None when no series can be outside, e.g. ``job=~".*"``). Prometheus' regexes are anchored
    RE2, Python's ``re.fullmatch`` agrees on the simple ones a selector uses."""
    matchers = [(k, op, re.sub(r"\\(.)", r"\1", v)) for k, op, v in _MATCHER.findall(selector)]
    inside: dict[str, str] = {}
    for key, op, value in matchers:
        usual = TARGET.get(key, "orders")
        if op == "=":
            inside[key] = value
        elif op == "=~":
            inside[key] = _value_matching(key, value, usual)
        else:
            inside[key] = next(c for c in (usual, f"{usual}-x", "x") if _matches(op, value, c))
    for key, op, value in matchers:
        candidates = (f"other-{inside[key]}", "other", value)
        other = next((c for c in candidates if not _matches(op, value, c)), None)
        if other is not None:
            return inside, {**inside, key: other}
    return inside, None


def _matches(op: str, value: str, label: str) -> bool:
    hit = label == value if op in ("=", "!=") else re.fullmatch(value, label) is not None
    return hit if op in ("=", "=~") else not hit


def _value_matching(key: str, regex: str, usual: str) -> str:
    """A label value the regex matches: the usual one, or the regex made literal."""
    candidates = [usual]
    for alternative in regex.split("|"):
        literal = alternative.strip("^$()").replace(".*", "").replace(".+", "x")
        candidates.append(re.sub(r"\\(.)", r"\1", literal))
    for candidate in candidates:
        if _matches("=~", regex, candidate):
            return candidate
    raise GeneratorError(
        f'selector {key}=~"{regex}": no label value for the promtool tests matches it; use a '
        'simpler regex, e.g. a prefix like "shop-.*" or alternatives like "orders|payments"'
    )


def _antipattern_tests(rules: dict, selected: dict[str, str]) -> list:
    """One test for every kind's alert: on one target a culprit's count appears (a new series,
    as the agent exports it) at 14m and grows: it fires, and resolves 10 minutes later; on
    another target a flat count keeps it quiet throughout."""
    name = m.ANTIPATTERNS.sample()
    quiet_target = {**TARGET, "instance": "10.0.0.8:9464"}
    inputs, checks = [], []
    for kind, (alert, _) in ANTIPATTERN_ALERTS.items():
        for target, culprit, values in (
            (TARGET, "", "0x30"),
            (TARGET, "app.views:orders", "_x14 1 3x15"),
            (quiet_target, "", "0x30"),
            (quiet_target, "app.views:orders", "2x30"),
        ):
            own = {**target, **selected, "kind": kind, "worker": "1", "culprit": culprit}
            body = ", ".join(f'{k}="{_escape(v)}"' for k, v in own.items())
            inputs.append({"series": f"{name}{{{body}}}", "values": values})
        expected = {**TARGET, **selected, "kind": kind, "severity": "warning", "signal": kind}
        fired = {
            "exp_labels": expected,
            "exp_annotations": {
                k: _render_template(v, expected, "3")
                for k, v in rules[alert]["annotations"].items()
            },
        }
        for minute, alerts in ((13, []), (16, [fired]), (27, [])):
            checks.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": alerts})
    return [
        {
            "name": "anti-patterns: a count that grew fires its kind's warning for 10m",
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": checks,
        }
    ]


def series_step(thresholds: Mapping[str, Threshold]) -> int:
    """The series' and evaluations' step: divides every `for` and window, 4+ steps a window."""
    durations = [ms(t.for_) for t in thresholds.values()]
    windows = [ms(t.window) for t in thresholds.values() if t.window]
    step = math.gcd(*durations, *windows)
    while step * 4 > min(windows, default=step * 4) and step % 2 == 0:
        step //= 2
    return step


def render(thresholds: Mapping[str, Threshold]) -> dict[str, str]:
    step = series_step(thresholds)
    rules = {r["alert"]: r for g in rule_groups(thresholds) for r in g["rules"] if "alert" in r}
    selector = getattr(thresholds, "selector", "")
    selected, outside = selector_labels(selector) if selector else ({}, None)
    tests = []
    for signal in SIGNALS:
        tests += _signal_tests(signal, thresholds[signal.key], rules, step, selected, outside)
    tests += _antipattern_tests(rules, selected)
    depth = TESTS_PATH.count("/")
    document = {
        "rule_files": ["../" * depth + RULES_PATH],
        "evaluation_interval": dur(step),
        "tests": tests,
    }
    header = (
        "# Generated by `poolwatch generate` with the rules it tests: do not edit.\n"
        f"# Run: promtool test rules {TESTS_PATH}\n"
    )
    return {TESTS_PATH: header + to_yaml(document)}
