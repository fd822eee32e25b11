"""The deployment's selector (``selector`` in the threshold table, set by `poolwatch generate
--overrides`): every series of every generated rule and dashboard query carries it, and an
alert does not fire on another service that exports the same metric names. The chart's own
``selector`` value is checked against these files in test_helm_integration.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

from poolwatch import metrics
from poolwatch.generators.promql import RECORDS
from poolwatch.generators.rule_tests import TESTS_PATH
from poolwatch.generators.rules import RULES_PATH
from tests.support.alerting import generate

SELECTOR = 'job=~"shop-.*", namespace!="test"'
WANTED = {'job=~"shop-.*"', 'namespace!="test"'}  # the matchers, as the parser prints them
DASHBOARDS = ("overview", "database-pools", "http-client-pools", "event-loop")
GRAFANA = {"$__rate_interval": "1m", "$__range": "1h"}  # Grafana's own variables, as it fills in


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("selected")
    generate(str(root), f"selector = '{SELECTOR}'\n")
    return root


def contract_samples() -> set[str]:
    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, metrics.Metric):
            parts = ("bucket", "count", "sum") if metric.kind == metrics.HISTOGRAM else ("",)
            names |= {metric.sample(part) for part in parts}
    return names


def vector_selectors(node) -> list:
    """Every vector selector of a parsed PromQL expression."""
    if type(node).__name__ == "VectorSelector":
        return [node]
    found = []
    for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
        child = getattr(node, attr, None)
        for item in child if isinstance(child, list) else [child]:
            if item is not None:
                found += vector_selectors(item)
    return found


def queries(root: Path) -> list[tuple[str, str]]:
    """(where, PromQL) of every rule, panel target and dashboard variable under ``root``."""
    out = []
    for group in yaml.safe_load((root / RULES_PATH).read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rules.yaml {rule.get('alert') or rule['record']}", rule["expr"]))
    for path in sorted((root / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name} #{panel['id']}", target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                inner = re.fullmatch(r"label_values\((.*), \w+\)", variable["query"])[1]
                out.append((f"{path.name} ${variable['name']}", inner))
    return [(where, re.sub(r"\$__\w+", lambda m: GRAFANA[m[0]], q)) for where, q in out]


def test_every_series_of_every_rule_and_panel_query_carries_the_selector(generated):
    known, records = contract_samples(), set(RECORDS.values())
    checked, files = 0, set()
    for where, query in queries(generated):
        for selector in vector_selectors(promql_parser.parse(query)):
            if selector.name in records:  # the recording rules selected their series already
                continue
            assert selector.name in known, f"{where}: {selector.name} is not a contract metric"
            matchers = {str(m) for m in selector.matchers.matchers}
            assert matchers >= WANTED, f"{where}: {selector} lacks the selector"
            checked += 1
            files.add(where.split(" ")[0])
    assert checked > 80
    assert files == {"rules.yaml", *(f"{name}.json" for name in DASHBOARDS)}


def test_an_alert_does_not_fire_for_another_services_series(generated, tmp_path):
    """The generated promtool tests put every series in the selector (so the alerts fire as
    without one) and add, per signal, another service over critical that must stay quiet.
    Against rules generated without the selector those tests fail: they catch a rule that
    forgets it."""
    document = yaml.safe_load((generated / TESTS_PATH).read_text())
    others = [case for case in document["tests"] if "another service" in case["name"]]
    assert len(others) == len(RECORDS)
    for case in others:
        for series in case["input_series"]:
            if not series["series"].startswith("postgresql_"):  # the sidecar's view, too
                assert 'job="other-' in series["series"], series
    fired = [case for case in document["tests"] if "just over" in case["name"]]
    assert all('job="shop-' in s["series"] for c in fired for s in c["input_series"])

    result = promtool("test", "rules", str(generated / TESTS_PATH))
    assert result.returncode == 0, result.stdout + result.stderr

    generate(str(tmp_path))  # the same thresholds, no selector
    shutil.copy(generated / TESTS_PATH, tmp_path / TESTS_PATH)
    result = promtool("test", "rules", str(tmp_path / TESTS_PATH))
    assert result.returncode == 1, result.stdout + result.stderr
    failed = set(re.findall(r"name: (\w+): another service", result.stdout + result.stderr))
    assert failed == set(RECORDS), result.stdout + result.stderr


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)
