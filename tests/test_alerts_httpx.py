"""The HTTP client utilization signal of the generated rules covers httpx pools: checked with
the real promtool on the committed rule file (active connections / max_connections per httpx
client; aiohttp's series beside them are never divided by an httpx limit, nor the reverse)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from poolwatch.generators.rules import RULES_PATH
from tests.support.apps import REPO

RECORD = "poolwatch:http_client_connection_utilization:ratio"
WHERE = 'job="orders", instance="10.0.0.7:9464", worker="1"'
HOST = 'server_address="api.pay", server_port="443", url_scheme="https"'


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{WHERE}, {labels}}}", "values": values}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_httpx_pools_are_measured_against_their_max_connections(tmp_path):
    active = 'http_connection_state="active"'
    tests = {
        "rule_files": [f"{REPO}/{RULES_PATH}"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # httpx client "payments": 19 of 20 connections active
                    series("http_client_open_connections", f'{HOST}, {active}, '
                           'httpx_client_name="payments"', "19x10"),
                    series("httpx_client_connection_limit", 'httpx_client_name="payments", '
                           'scope="total"', "20x10"),
                    series("httpx_client_connection_limit", 'httpx_client_name="payments", '
                           'scope="keepalive"', "20x10"),
                    # an unlimited httpx client exports no limit: no ratio
                    series("http_client_open_connections", f'{HOST}, {active}, '
                           'httpx_client_name="default"', "50x10"),
                    # an aiohttp session to the same host, limit 100 in all
                    series("http_client_open_connections", f"{HOST}, {active}", "10x10"),
                    series("aiohttp_client_connection_limit", 'scope="total"', "100x10"),
                    series("aiohttp_client_connection_limit", 'scope="per_host"', "0x10"),
                ],
                "promql_expr_test": [
                    {
                        "expr": RECORD,
                        "eval_time": "1m",
                        "exp_samples": [
                            {"labels": f'{RECORD}{{{WHERE}, httpx_client_name="payments"}}',
                             "value": 0.95},
                            {"labels": f"{RECORD}{{{WHERE}}}", "value": 0.1},
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "httpx_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
