"""Grafana dashboards: generated from the threshold table (and `generate --check` finds a stale
one), the agent free of the dashboard builder, every panel explained and filtered by every
variable, valid against Grafana's own schema. That every panel query returns data from a real
Prometheus: test_dashboards_live.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from poolwatch import metrics
from poolwatch.generators.dashboards import ALERT_PANELS, UID, panel_path, render
from poolwatch.generators.promql import RECORDS
from poolwatch.thresholds import defaults, load
from tests.support.apps import REPO
from tests.support.dashboards import DASHBOARDS, METRIC, VARIABLE, load_dashboard, targets
from tests.support.grafana_schema import schema_path

CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
BUILTINS = {"__rate_interval", "__range", "__interval"}


def contract_series() -> set[str]:
    """Every Prometheus series name of the metric contract (metrics.py), and the series of the
    recording rules (the panels of the alerts' signals read those)."""
    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, metrics.Metric):
            base = metric.prom_name
            if metric.kind == metrics.HISTOGRAM:
                names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
            elif metric.kind == metrics.COUNTER:
                names.add(f"{base}_total")
            else:
                names.add(base)
    return names | set(RECORDS.values())


# --- generated from the table --------------------------------------------------------------------
def test_generate_check_covers_the_dashboards(tmp_path):
    def generate(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "poolwatch.cli", "generate", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)

    committed = generate("--check")
    assert committed.returncode == 0, committed.stdout + committed.stderr
    assert {f"dashboards/{p.name}" for p in DASHBOARDS} == {
        f"dashboards/{name}.json"
        for name in ("overview", "database-pools", "http-client-pools", "event-loop")
    }

    assert generate("--root", str(tmp_path)).returncode == 0
    stale = tmp_path / "dashboards" / "event-loop.json"
    stale.write_text(stale.read_text().replace('"Event-loop lag p99"', '"Lag"', 1))
    result = generate("--check", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "out of date: dashboards/event-loop.json" in result.stdout
    assert "overview.json" not in result.stdout


def test_the_agent_does_not_need_the_dashboard_builder():
    """Without grafana-foundation-sdk the agent imports and runs, runbook links still resolve, and
    `generate --check` checks the stock files (the SDK is needed only to rebuild dashboards)."""
    code = (
        "import sys; sys.modules['grafana_foundation_sdk'] = None\n"
        "import poolwatch; poolwatch.instrument(metrics_port=0)\n"
        "from poolwatch.generators.dashboards import panel_path\n"
        "print(panel_path('loop_lag_p99'))\n"
        "from poolwatch.cli import main; sys.exit(main(['generate', '--check']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("/d/poolwatch-event-loop?viewPanel=2\n")
    assert "Traceback" not in result.stderr


def _steps(dashboard: dict, panel_id: int) -> list[tuple[float | None, str]]:
    panel = next(p for p in dashboard["panels"] if p["id"] == panel_id)
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [(step["value"], step["color"]) for step in steps]


def test_thresholds_lines_and_colours_come_from_the_table(tmp_path):
    overrides = tmp_path / "mine.toml"
    overrides.write_text(
        "[pool_utilization]\nwarning = 0.6\ncritical = 0.8\n"
        "[loop_lag_p99]\nwarning = 0.05\ncritical = 0.5\n"
    )
    for table in (defaults(), load(overrides)):
        boards = {(d := json.loads(text))["uid"]: d for text in render(table).values()}
        assert set(ALERT_PANELS) == set(table), "every signal has a panel to link to"
        for signal, (uid, panel_id) in ALERT_PANELS.items():
            t = table[signal]
            assert _steps(boards[uid], panel_id) == [
                (None, "green"),
                (t.warning, "orange"),
                (t.critical, "red"),
            ], signal
            panel = next(p for p in boards[uid]["panels"] if p["id"] == panel_id)
            assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"] == {
                "mode": "dashed"
            }
        # the overview's "what is wrong now" tiles use the same values
        overview = boards[UID["overview"]]
        assert _steps(overview, 1)[1:] == [
            (table["pool_utilization"].warning, "orange"),
            (table["pool_utilization"].critical, "red"),
        ]
        lag = next(p for p in overview["panels"] if p["id"] == 5)
        assert f"{table['loop_lag_p99'].warning * 1000:g} ms" in lag["description"]
    assert panel_path("pool_utilization") == "/d/poolwatch-db-pools?viewPanel=2"


def test_panels_explain_themselves_and_filter_by_every_variable():
    known = contract_series()
    uids = set()
    for path in DASHBOARDS:
        board = load_dashboard(path)
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"datasource", "namespace", "job", "service", "instance", "worker"} <= set(variables)
        for name, variable in variables.items():
            if variable["type"] == "query":  # fleet by default, drill down by choosing
                assert variable["includeAll"] and variable["allValue"] == ".*", name
                assert variable["current"]["value"] == "$__all", name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            where = f"{path.name} #{panel['id']} {panel['title']}"
            assert len(panel.get("description", "")) > 60, f"{where}: no real description"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in targets(board):
            used = set(VARIABLE.findall(target.expr))
            assert used <= set(variables) | BUILTINS, f"{target.name}: {used}"
            if target.server_wide:
                continue
            for var in ("namespace", "job", "service", "instance", "worker"):
                assert f'{var}=~"${var}"' in target.expr, f"{target.name}: no ${var} filter"
            series = set(METRIC.findall(target.expr))
            assert series <= known, f"{target.name}: not in the metric contract: {series - known}"
    assert uids == set(UID.values())


def test_dashboards_validate_against_the_grafana_schema(tmp_path):
    def check(schema: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
        cmd = [str(CHECK_JSONSCHEMA), "--schemafile", str(schema_path(schema)), *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    result = check("dashboard", DASHBOARDS)
    assert result.returncode == 0, result.stdout + result.stderr

    # Panel options and custom field config against each panel plugin's own schema.
    fragments: dict[str, list[Path]] = {}
    for path in DASHBOARDS:
        for panel in load_dashboard(path)["panels"]:
            if panel["type"] == "row":
                continue
            parts = {"options": panel["options"]}
            custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
            if custom is not None:
                parts["fieldconfig"] = custom
            for kind, value in parts.items():
                file = tmp_path / f"{path.stem}-{panel['id']}-{kind}.json"
                file.write_text(json.dumps(value))
                fragments.setdefault(f"{panel['type']}.{kind}", []).append(file)
    assert {"timeseries.options", "stat.options", "heatmap.options"} <= set(fragments)
    for schema, files in fragments.items():
        result = check(schema, files)
        assert result.returncode == 0, f"{schema}: {result.stdout}{result.stderr}"

    # The check bites: a misspelled key and a wrong type are both reported.
    broken = load_dashboard(DASHBOARDS[0])
    broken["panels"][1]["gridpos"] = broken["panels"][1].pop("gridPos")
    broken["refresh"] = 30
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    result = check("dashboard", [bad])
    assert result.returncode == 1
    assert "'gridpos' was unexpected" in result.stdout
