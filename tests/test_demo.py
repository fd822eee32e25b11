"""Issue 2: `poolwatch demo`, the README's first command, runs and shows the pool running dry."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.support.net import free_port, scrape, wait_for_port


def test_demo_walks_healthy_to_exhaustion_with_metrics_open():
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poolwatch.cli",
            "demo",
            "--duration",
            "9",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
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
    assert "phase: healthy" in output and "phase: pool exhaustion" in output
    assert "phase: blocked loop" in output
    pool = {"db_client_connection_pool_name": "demo.db"}
    assert during.value("db_client_connection_max", **pool) == 6
    assert (
        during.value("db_client_connection_count", db_client_connection_state="used", **pool) == 6
    )
    assert during.value("db_client_connection_pending_requests", **pool) > 0
    assert "demo.db                          6/6       ####################" in output
    # the report's N+1 (its deliberate second bug) is flagged, named, and nothing before it
    assert {s.value for s in during.find("poolwatch_antipatterns_total")} == {0}
    assert "poolwatch: n_plus_one: the same statement run 10+ times" in output
    assert "poolwatch.cli.demo:build_app.<locals>.report" in output
    assert "anti-patterns: n_plus_one " in output


def test_demo_on_port_zero_picks_free_ports_and_says_which():
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    cmd = [sys.executable, "-m", "poolwatch.cli", "demo", "--duration", "3"]
    done = subprocess.run(
        [*cmd, "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "http://127.0.0.1:0" not in done.stdout
    assert "metrics unavailable" not in done.stdout
    assert "demo.db" in done.stdout  # the view read the pool from the chosen metrics port
