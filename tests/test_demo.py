"""`poolwatch demo`, the README's first command: it runs, shows the pool running dry and the loop
blocked, keeps its own load out of the app's metrics, refreshes one screen in place in a real
terminal (tmux) and ends with a summary and the next step."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from tests.support.apps import REPO
from tests.support.net import free_port, scrape, wait_for_port
from tests.test_top import Tmux, poolwatch_command

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
HEADER = "poolwatch demo · app http://127.0.0.1:"


def test_demo_walks_healthy_to_exhaustion_with_metrics_open():
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "poolwatch.cli", "demo", "--duration", "9"),
            *("--port", str(port), "--metrics-port", str(metrics_port)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**CLEAN_ENV, "COLUMNS": "120"},
    )
    try:
        wait_for_port(metrics_port, proc=proc)
        time.sleep(4.5)  # inside the exhaustion phase (3 s - 6 s)
        during = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    pool = {"db_client_connection_pool_name": "demo.db"}
    assert during.value("db_client_connection_max", **pool) == 6
    assert (
        during.value("db_client_connection_count", db_client_connection_state="used", **pool) == 6
    )
    assert during.value("db_client_connection_pending_requests", **pool) > 0
    # the load generator is not the app's HTTP client: only the app's session, limit=4
    assert during.find("http_client_open_connections", server_port=str(port)) == []
    assert during.value("aiohttp_client_connection_limit", scope="total") == 4
    # piped: the last frame of each phase, then the summary
    for phase in ("1/3: healthy", "2/3: pool exhaustion", "3/3: blocked loop"):
        assert f"phase {phase}" in output
    assert re.search(r"demo\.db\s+6/6\s+######", output)
    assert "event loop blocked" not in output  # no log line per block...
    assert re.search(r"recent blocks \(last 5 s\): \d+ x \d+ ms max in \S+:", output)  # ...one line
    summary = output[output.index("poolwatch demo: what it showed") :]
    assert re.search(r"2\. pool exhaustion, 32 clients on /orders: pool at most 6/6", summary)
    assert re.search(r"the\s+loop\s+blocked\s+[1-9]\d*\s+times", summary)
    assert (
        "app = instrument(app)" in summary and f"poolwatch top 127.0.0.1:{metrics_port}" in summary
    )
    # the report's N+1 (its deliberate second bug) is flagged, named, and nothing before it
    assert {s.value for s in during.find("poolwatch_antipatterns_total")} == {0}
    assert "poolwatch: n_plus_one: the same statement run 10+ times" in output
    assert "poolwatch.cli.demo:build_app.<locals>.report" in output
    assert "anti-patterns: n_plus_one " in output


def test_demo_on_port_zero_picks_free_ports_and_says_which():
    cmd = [sys.executable, "-m", "poolwatch.cli", "demo", "--duration", "3"]
    done = subprocess.run(
        [*cmd, "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "http://127.0.0.1:0" not in done.stdout
    assert "metrics unavailable" not in done.stdout
    assert "demo.db" in done.stdout  # the view read the pool from the chosen metrics port


def view_height(screen: str) -> int:
    """Lines from the view's header to its last line, "recent blocks"."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("recent blocks"))
    return bottom - top + 1


def test_demo_redraws_one_screen_in_place_and_ends_with_the_summary():
    demo = poolwatch_command("demo", "--duration", "9", "--port", "0", "--metrics-port", "0")
    terminal = Tmux(f"cd {shlex.quote(REPO)} && {demo}; echo EXIT=$?; sleep 60", 100, 60)
    try:
        first = terminal.wait_for(r"phase 1/3: healthy.*\n(.*\n)*recent blocks")
        second = terminal.wait_for(r"phase 2/3: pool exhaustion.*\n(.*\n)*recent blocks")
        third = terminal.wait_for(r"phase 3/3: blocked loop(.*\n)*recent blocks \(last")
        for screen in (first, second, third):
            assert screen.count(HEADER) == 1, screen  # redrawn, not scrolled
        heights = {view_height(screen) for screen in (first, second, third)}
        assert len(heights) == 1, (first, second, third)  # the same lines, refreshed
        final = terminal.wait_for(r"EXIT=\d+", timeout=30)
        assert "EXIT=0" in final and "Traceback" not in final
        assert final.count(HEADER) == 1  # the last frame stays, the summary under it
        assert final.index(HEADER) < final.index("poolwatch demo: what it showed")
        assert "app = instrument(app)" in final
    finally:
        terminal.kill()
