"""The README a newcomer reads: its first python block runs as written under uvicorn and is
scraped; its configuration table agrees with the code; it stays a README (short, no issue
numbers, no dated benchmark logs, no files outside the repository)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from poolwatch import __version__, config
from tests.support.apps import REPO, stop_process
from tests.support.net import free_port, get, scrape, wait_for_port

README = (Path(REPO) / "README.md").read_text()


def test_first_python_block_runs_as_written_under_uvicorn(tmp_path):
    main = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "main.py").write_text(main)
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    env["POOLWATCH_METRICS_PORT"] = str(metrics_port)  # 9464 as written, but free here
    env["PYTHONPATH"] = os.path.join(REPO, "agent")  # this checkout's poolwatch
    # `uvicorn main:app`, as the README says, on a free port
    cmd = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)]
    log = tmp_path / "uvicorn.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        wait_for_port(metrics_port, proc=proc)
        assert get(f"http://127.0.0.1:{port}/") == '{"value":1}'
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop_process(proc)
    pool = {"db_client_connection_pool_name": "app.db"}
    assert metrics.value("db_client_connection_max", **pool) == 15  # pool_size 5 + overflow 10
    assert metrics.value("db_client_connection_wait_time_seconds_count", **pool) == 1
    assert metrics.value("http_server_active_requests", http_request_method="GET") == 0
    # the lines the README shows are what the app serves
    shown = re.search(r"grep db_client_connection\n```\n\n```\n(.*?)\.\.\.\n```", README, re.S)
    for line in shown.group(1).splitlines():
        assert line in metrics.text, line
    assert "Traceback" not in log.read_text()


def test_configuration_table_matches_the_settings():
    rows = re.findall(r"^\| `(\w+)` \| `(POOLWATCH_\w+)` \| (`[^`]*`|unset) \|", README, re.M)
    assert len(rows) == 5
    defaults = {f.name: f.default for f in fields(config.Settings)}
    for option, variable, default in rows:
        assert config.SPECS[option].env == variable
        expected = defaults[option]
        shown = None if default == "unset" else default.strip("`")
        assert shown == (None if expected is None else str(expected).lower()), option


def test_every_setting_has_a_meaning_for_the_generated_table():
    assert set(config.MEANING) == set(config.SPECS)


def test_it_stays_a_readme():
    lines = README.splitlines()
    assert len(lines) <= 300
    assert "poolwatch demo" in "\n".join(lines[:6])  # the first screen shows the demo
    assert "scripts/test" in "\n".join(lines[:6])
    assert f"dist/poolwatch-{__version__}-py3-none-any.whl" in README  # the install is true
    assert not re.search(r"\bissue \d+|\(issue|DESIGN", README)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README)  # no dated benchmark runs
    for target in re.findall(r"\]\(([^)#]+)", README):  # every relative link resolves
        if not target.startswith("http"):
            assert (Path(REPO) / target).exists(), target


def test_the_sites_reference_tables_are_generated_from_the_code():
    import importlib.util

    from poolwatch import metrics

    path = Path(REPO) / "scripts" / "mkdocs_hooks.py"
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", path)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown("<!-- poolwatch:metrics -->\n<!-- poolwatch:settings -->")
    for metric in vars(metrics).values():
        if isinstance(metric, metrics.Metric):
            assert f"| `{metric.sample()}` |" in page
    for name, spec_ in config.SPECS.items():
        assert f"| `{name}` | `{spec_.env}` |" in page
