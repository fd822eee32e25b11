"""The threshold table: DESIGN §4 values, overrides, and clear errors for bad override files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from poolwatch.thresholds import ThresholdError, defaults, load

DESIGN_TABLE = {
    "pool_utilization": (0.70, 0.90),
    "connection_wait_p99": (0.1, 1.0),
    "overflow_usage": (0.50, 0.80),
    "failed_checkouts": (1, 10),
    "loop_lag_p99": (0.1, 1.0),
    "http_client_utilization": (0.70, 0.90),
    "fleet_connection_budget": (0.90, 1.00),
}


def test_defaults_are_the_design_table():
    table = defaults()
    assert {key: (t.warning, t.critical) for key, t in table.items()} == DESIGN_TABLE
    assert table["pool_utilization"].level(0.95) == "critical"
    assert table["pool_utilization"].level(0.75) == "warning"
    assert table["pool_utilization"].level(0.70) == "ok"


def test_the_selector_is_empty_by_default_and_overridable(tmp_path):
    assert defaults().selector == ""
    path = tmp_path / "mine.toml"
    path.write_text('selector = \' job=~"shop-.*", namespace="prod" \'\n')
    table = load(path)
    assert table.selector == 'job=~"shop-.*", namespace="prod"'
    assert dict(table) == dict(defaults())


def test_override_changes_only_the_given_keys(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[pool_utilization]\nwarning = 0.6\nfor = "10m"\n')
    table = load(path)
    assert table["pool_utilization"].warning == 0.6
    assert table["pool_utilization"].critical == 0.9
    assert table["pool_utilization"].for_ == "10m"
    assert table["loop_lag_p99"] == defaults()["loop_lag_p99"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pool_utilisation]\nwarning = 0.6\n", "unknown signal 'pool_utilisation'"),
        ("[pool_utilization]\nwarning = 'high'\n", "must be a number >= 0"),
        ('[pool_utilization]\nfor = "five minutes"\n', "must be a duration"),
        ("[pool_utilization]\nwarning = 0.95\n", "warning must not exceed"),
        ("[pool_utilization\n", "not valid TOML"),
        ("[pool_utilization]\nwarn = 0.5\n", "is not a setting"),
        ("selector = 'job=orders'\n", "must be PromQL label matchers without braces"),
        ("selector = '{job=\"orders\"}'\n", "must be PromQL label matchers without braces"),
    ],
)
def test_bad_override_files_are_rejected_clearly(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ThresholdError, match=message):
        load(path)


def test_cli_reports_a_bad_override_file_in_one_line_with_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[nope]\nwarning = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "generate", "--check", "--overrides", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown signal 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
