"""Issues 6 and 12: the generated rules and routing, checked with the real promtool and amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from poolwatch.generators import rules as gen_rules
from poolwatch.generators.alertmanager import ALERTMANAGER_PATH
from poolwatch.generators.promql import POOL
from poolwatch.generators.rules import (
    ANTIPATTERN_ALERTS,
    RULES_PATH,
    SIGNALS,
    rule_groups,
    value_text,
)
from poolwatch.thresholds import ThresholdError, defaults, load
from tests.support.alerting import SHORT_WINDOWS, generate

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = REPO / "alerts" / "runbook.md"
TESTS = REPO / "tests" / "alerts"
POOL_SIGNALS = ("pool_utilization", "connection_wait_p99", "overflow_usage", "failed_checkouts")


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts_of(path: Path) -> dict[str, dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_generate_check_passes_on_the_committed_files():
    result = run(sys.executable, "-m", "poolwatch.cli", "generate", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_check_names_a_stale_or_missing_file(tmp_path):
    generate(str(tmp_path))
    rules = tmp_path / RULES_PATH
    rules.write_text(rules.read_text().replace("> 0.9", "> 0.95"))
    (tmp_path / ALERTMANAGER_PATH).unlink()
    args = [sys.executable, "-m", "poolwatch.cli", "generate", "--check", "--root", str(tmp_path)]
    result = run(*args)
    assert result.returncode == 1
    assert f"out of date: {RULES_PATH}" in result.stdout
    assert f"missing: {ALERTMANAGER_PATH}" in result.stdout  # told apart from out of date


def test_promtool_checks_every_generated_rule_file():
    files = sorted((REPO / "alerts").glob("*.rules.yaml"))
    assert files
    result = run("promtool", "check", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 28 rules found" in result.stdout  # 7 recording + 14 alerts + 7 diagnosis


def test_promtool_unit_tests_pass():
    files = sorted(TESTS.glob("*_test.yaml"))
    assert files
    result = run("promtool", "test", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_fire_and_quiet_every_alert():
    """Every alert has a firing case (checked one step before and at `for:`) and stays quiet
    just under its threshold; every signal has a spike shorter than `for:` that stays quiet."""
    document = yaml.safe_load((TESTS / "poolwatch_test.yaml").read_text())
    fired, quiet, spikes = set(), set(), set()
    for case in document["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
        if "spike" in case["name"]:
            spikes.add(case["name"].split(":")[0])
        if "just over" in case["name"]:
            times = [c["eval_time"] for c in case["alert_rule_test"]]
            assert len(set(times)) == 2, case["name"]  # before, and at the firing moment
    names = set(alerts_of(REPO / RULES_PATH))
    assert fired == names and quiet == names
    assert spikes == {s.key for s in SIGNALS}


@pytest.mark.parametrize(
    "overrides",
    [
        SHORT_WINDOWS,
        '[pool_utilization]\nwarning = 0.55\ncritical = 0.555\nfor = "7m"\n'
        '[connection_wait_p99]\nwarning = 0.2\ncritical = 0.3\nwindow = "5m"\nfor = "3m"\n'
        '[failed_checkouts]\nwarning = 3\ncritical = 3.5\nfor = "10m"\nwindow = "2m"\n'
        '[fleet_connection_budget]\nwarning = 0.8\ncritical = 1.2\nfor = "1h"\n',
    ],
    ids=["short-windows", "odd-values"],
)
def test_overridden_rules_pass_their_generated_unit_tests(tmp_path, overrides):
    generate(str(tmp_path), overrides)
    result = run("promtool", "check", "rules", str(tmp_path / RULES_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run("promtool", "test", "rules", str(tmp_path / "tests/alerts/poolwatch_test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    table = load(tmp_path / "overrides.toml")
    for rule in alerts_of(tmp_path / RULES_PATH).values():
        if rule["labels"]["signal"] in ANTIPATTERN_ALERTS:  # no threshold: a count that grew
            continue
        t = table[rule["labels"]["signal"]]
        assert rule["for"] == t.for_
        assert rule["expr"].endswith(f"> {value_text(t, rule['labels']['severity'])}")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("max without (worker)", "avg without (worker)"),  # averaging hides a starved worker
        ("sum without (worker)", "max without (worker)"),  # timeouts are the workers' sum
        ("for: 5m", "for: 4m"),
        ("[1m]", "[2m]"),
        ("histogram_quantile(0.99", "histogram_quantile(0.9"),
        ("- postgresql_connection_reserved", ""),
        ("busiest worker", "worst worker"),
        ("offset 10m", "offset 20m"),  # an anti-pattern alert that never resolves
    ],
)  # fmt: skip
def test_the_unit_tests_catch_a_broken_rule(tmp_path, old, new):
    (tmp_path / "alerts").mkdir()
    (tmp_path / "tests/alerts").mkdir(parents=True)
    shutil.copy(TESTS / "poolwatch_test.yaml", tmp_path / "tests/alerts")
    rules = (REPO / RULES_PATH).read_text()
    assert old in rules
    (tmp_path / RULES_PATH).write_text(rules.replace(old, new))
    result = run("promtool", "test", "rules", str(tmp_path / "tests/alerts/poolwatch_test.yaml"))
    assert result.returncode == 1 and "FAILED" in result.stdout + result.stderr


def test_rules_follow_the_table():
    table = defaults()
    alerts = alerts_of(REPO / RULES_PATH)
    assert len(alerts) == 2 * len(table) + len(ANTIPATTERN_ALERTS)
    for kind, (alert, _) in ANTIPATTERN_ALERTS.items():  # a warning per anti-pattern kind
        assert alerts[alert]["labels"] == {"severity": "warning", "signal": kind}
        assert f'kind="{kind}"' in alerts[alert]["expr"]
    for signal in SIGNALS:
        t = table[signal.key]
        for severity in ("warning", "critical"):
            rule = alerts[f"{signal.alert}{severity.capitalize()}"]
            assert rule["labels"] == {"severity": severity, "signal": signal.key}
            assert rule["for"] == t.for_
            assert rule["expr"].endswith(f" > {getattr(t, severity):g}")
            assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
            assert "$value" in rule["annotations"]["description"]
            if signal.key in POOL_SIGNALS:
                assert (
                    "$labels.db_client_connection_pool_name" in rule["annotations"]["description"]
                )
    assert alerts["PoolUtilizationCritical"]["expr"] == (
        "max without (worker) (poolwatch:db_client_connection_utilization:ratio) > 0.9"
    )
    assert "[1m]" in (REPO / RULES_PATH).read_text()  # failed_checkouts' window


def _anchor(heading: str) -> str:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_url_points_at_a_runbook_section():
    text = RUNBOOK.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for rule in alerts_of(REPO / RULES_PATH).values():
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "alerts/runbook.md" and anchor in anchors, anchor
        assert rule["alert"] in text  # the section names its alerts
    for link in re.findall(r"\]\(#([^)]+)\)", text):  # the runbook's own cross-references
        assert link in anchors, link
    from poolwatch.generators.dashboards import panel_path

    for signal in SIGNALS:  # each section links the dashboard panel of its signal
        section = text.split(f"## {signal.key}\n", 1)[1].split("\n## ", 1)[0]
        assert panel_path(signal.key) in section, signal.key
    for topic in ("Little's law", "leak", "blocking", "max_connections", "amtool silence"):
        assert topic.lower() in text.lower(), topic


def test_rule_groups_take_placeholders_for_every_value():
    """The Helm chart renders the rules with its own placeholders: replacing them by the table's
    values must give exactly the committed rules, so no value is left hard-coded."""
    table = defaults()
    groups = rule_groups(table, param=lambda key, field: f"PARAM_{key}_{field}")
    text = gen_rules.to_yaml({"groups": groups})
    for signal in SIGNALS:
        fields = ["warning", "critical", "for"] + (["window"] if table[signal.key].window else [])
        for name in fields:
            placeholder = f"PARAM_{signal.key}_{name}"
            assert placeholder in text
            text = text.replace(placeholder, value_text(table[signal.key], name))
    assert gen_rules.HEADER + text == (REPO / RULES_PATH).read_text()


def test_windows_are_overridable_only_where_a_rate_is_taken(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[loop_lag_p99]\nwindow = "30s"\n')
    assert load(path)["loop_lag_p99"].window == "30s"
    path.write_text('[pool_utilization]\nwindow = "30s"\n')
    with pytest.raises(ThresholdError, match=r"pool_utilization.window is not a setting"):
        load(path)
    path.write_text('[failed_checkouts]\nwindow = "a minute"\n')
    with pytest.raises(ThresholdError, match="must be a duration"):
        load(path)


# --- Alertmanager (issue 12) ---


def test_amtool_accepts_the_shipped_configuration():
    result = run("amtool", "check-config", str(REPO / ALERTMANAGER_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 inhibit rules" in result.stdout and "2 receivers" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ("PoolUtilizationCritical severity=critical signal=pool_utilization", "pager"),
        ("CheckoutTimeoutsCritical severity=critical signal=failed_checkouts", "pager"),
        ("PoolUtilizationWarning severity=warning signal=pool_utilization", "chat"),
        ("EventLoopLagWarning severity=warning signal=loop_lag_p99", "chat"),
        ("SomebodyElsesAlert severity=critical", "chat"),  # not a poolwatch alert: the default
    ],
)
def test_amtool_routes_critical_to_the_pager_and_warnings_to_chat(labels, receiver):
    alertname, *labels = labels.split()
    labels = [f"alertname={alertname}", *labels, "service=orders", f"{POOL}=db:5432/orders"]
    args = ["amtool", "config", "routes", "test", f"--config.file={REPO / ALERTMANAGER_PATH}"]
    result = run(*args, *labels)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [receiver]
    wrong = "chat" if receiver == "pager" else "pager"
    result = run(*args, f"--verify.receivers={wrong}", *labels)
    assert result.returncode != 0


def test_routing_groups_by_service_and_pool_and_inhibits_the_twin():
    config = yaml.safe_load((REPO / ALERTMANAGER_PATH).read_text())
    ours = config["route"]["routes"][0]
    assert "worker" not in ours["group_by"] and "instance" not in ours["group_by"]
    assert {"service", "db_client_connection_pool_name", "server_address"} <= set(ours["group_by"])
    assert "alertname" not in ours["group_by"]  # one page per pool, whatever fired
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["equal"] == ["signal", *ours["group_by"]]
    text = (REPO / ALERTMANAGER_PATH).read_text()
    assert "http://" not in text and "https://" not in text  # no endpoint: secrets from files
    assert "routing_key_file" in text and "api_url_file" in text
