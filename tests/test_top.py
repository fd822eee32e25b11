"""Issue 10: `poolwatch top` in a real terminal (tmux) against a running `poolwatch demo`; its
errors; and its rendering of loop and aiohttp series, coloured by the threshold table."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry, generate_latest

from poolwatch.cli.scrape import parse
from poolwatch.exporters.prometheus import PoolwatchCollector
from poolwatch.metrics import (
    AIOHTTP_LIMIT,
    AIOHTTP_PENDING,
    AIOHTTP_WAIT_TIME,
    BUCKETS,
    BUILD_INFO,
    HTTP_CLIENT_OPEN,
    LOOP_BLOCKED,
    LOOP_BLOCKS,
    LOOP_LAG,
    LOOP_TASKS,
    HistogramValue,
    Point,
)
from tests.support import planted
from tests.support.apps import REPO
from tests.support.net import free_port, scrape, wait_for_port

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}


class Tmux:
    """A private tmux server (its own socket) running one command in a fixed-size window."""

    def __init__(self, command: str, width: int = 150, height: int = 45) -> None:
        self.socket = f"poolwatch-test-{os.getpid()}-{free_port()}"
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command)

    def tmux(self, *args: str) -> str:
        # COLUMNS/LINES (pytest sets them) would override the pane's real size.
        env = {k: v for k, v in CLEAN_ENV.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True, env=env
        ).stdout

    def pane(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pane = self.pane()
            if re.search(pattern, pane):
                return pane
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never showed; the screen was:\n{self.pane()}")

    def kill(self) -> None:
        path = subprocess.run(
            ["tmux", "-L", self.socket, "display-message", "-p", "#{socket_path}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        if path.endswith(self.socket) and os.path.exists(path):
            os.unlink(path)  # tmux leaves its socket file behind


def poolwatch_command(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "poolwatch.cli", *args))


def test_top_shows_the_demo_pool_running_dry_and_quits_on_ctrl_c():
    port, metrics_port = free_port(), free_port()
    demo = subprocess.Popen(
        [
            *(sys.executable, "-m", "poolwatch.cli", "demo", "--duration", "15"),
            *("--port", str(port), "--metrics-port", str(metrics_port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=CLEAN_ENV,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    terminal = None
    try:
        wait_for_port(metrics_port, proc=demo)
        # host:port is taken as http://host:port/metrics; the screen fits an 80-column terminal
        top = poolwatch_command("top", f"127.0.0.1:{metrics_port}", "--interval", "0.5")
        terminal = Tmux(f"cd {shlex.quote(REPO)} && {top}; echo EXIT=$?; sleep 60", width=80)
        screen = terminal.wait_for(r"demo\.db")
        assert f"poolwatch top · {url}" in screen
        assert "connection pools" in screen and "wait p99" in screen
        assert "timeouts" in screen and "/min" in screen and "overflow" in screen
        assert "…" not in screen  # no header or number cut short
        # Phase 2 (5-10 s): 32 clients on a pool of max 6; the row shows it full, with a queue
        # and checkouts timing out (pool_timeout 0.25 s) in red.
        screen = terminal.wait_for(r"demo\.db\s+6/6\s+#{6}\s+0\s+[1-9]\d*\s+\d+ ms\s+[1-9]")
        assert "…" not in screen
        row = next(line for line in screen.splitlines() if "demo.db" in line)
        wait_ms = int(re.search(r"(\d+) ms", row).group(1))
        # Waits last up to pool_timeout (0.25 s); p99 interpolates inside the histogram bucket
        # that holds it, (0.1, 0.25] or (0.25, 0.5] on a busy machine.
        assert 100 <= wait_ms <= 500
        if "asyncio_event_loop_lag_seconds" in scrape(url).text:  # the loop probe (issue 4)
            screen = terminal.wait_for(r"event loop: lag p99 \d+")
        terminal.tmux("send-keys", "-t", "top", "C-c")
        after = terminal.wait_for(r"EXIT=\d+", timeout=5)
        assert "EXIT=0" in after and "Traceback" not in after
        assert "connection pools" not in after  # the alternate screen was left, as top(1) does
    finally:
        if terminal is not None:
            terminal.kill()
        demo.terminate()
        demo.wait(timeout=15)


def top(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "top", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=CLEAN_ENV,
    )
    planted.scan(result.stdout + result.stderr, "the output of poolwatch top")
    return result


def test_unreachable_or_foreign_endpoint_is_one_clear_line(app_server, postgres):
    closed = free_port()
    result = top(f"http://127.0.0.1:{closed}/metrics")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"poolwatch top: cannot reach http://127.0.0.1:{closed}/metrics"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    server = app_server("tests.apps.pool_app:app", {"SA_URL": postgres.dsn("postgresql+asyncpg")})
    result = top(f"{server.url}/ok")  # JSON from the app itself, not its /metrics
    assert result.returncode == 2
    assert "is not a poolwatch /metrics endpoint (no poolwatch_build_info series)" in result.stderr
    result = top(f"{server.url}/nothing-here")
    assert result.returncode == 2 and "answered HTTP 404" in result.stderr
    result = top(server.metrics_url, "--interval", "0")
    assert result.returncode == 2 and "--interval" in result.stderr
    result = top(server.metrics_url, "--thresholds", "/nonexistent/overrides.toml")
    assert result.returncode == 2 and "cannot read the override file" in result.stderr


def test_token_protected_endpoint(app_server, postgres):
    env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "POOLWATCH_METRICS_TOKEN": planted.METRICS_TOKEN,
    }
    server = app_server("tests.apps.pool_app:app", env)
    result = top(server.metrics_url)
    assert result.returncode == 2
    assert "answered 401 Unauthorized: give its bearer token with --token" in result.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolwatch.cli", "top", server.metrics_url, "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**CLEAN_ENV, "POOLWATCH_METRICS_TOKEN": planted.METRICS_TOKEN, "COLUMNS": "160"},
    )
    time.sleep(1.0)
    proc.send_signal(subprocess.signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{postgres.port}/app" in out and planted.METRICS_TOKEN not in out + err


def test_piped_output_prints_frames_and_survives_the_app_going_away(app_server, postgres):
    server = app_server("tests.apps.pool_app:app", {"SA_URL": postgres.dsn("postgresql+asyncpg")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolwatch.cli", "top", server.metrics_url, "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**CLEAN_ENV, "COLUMNS": "160"},  # piped: rich's width is 80 unless COLUMNS says
    )
    time.sleep(2.0)
    server.stop()  # the app goes away: top keeps its last screen and says why
    time.sleep(1.5)
    proc.send_signal(subprocess.signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.count("connection pools") >= 5  # one frame per refresh
    assert "since start, rates next refresh" in out and re.search(r"last 0\.[5-9]s", out)
    assert f"127.0.0.1:{postgres.port}/app" in out
    assert f"refresh failed, retrying: cannot reach {server.metrics_url}" in out


def histogram(values: list[float]) -> HistogramValue:
    counts = [0] * (len(BUCKETS) + 1)
    for value in values:
        counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1
    return HistogramValue(tuple(counts), sum(values))


def exposition(points: list[Point]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolwatchCollector(lambda: [Point(BUILD_INFO, {"version": "t"}, 1), *points]))
    return generate_latest(registry).decode()


def test_loop_and_http_client_rows_with_threshold_colours():
    from rich.console import Console

    from poolwatch.cli.top import Screen
    from poolwatch.thresholds import load

    host = {"server_address": "api.internal", "server_port": "443"}

    def snapshot(lags: list[float], blocks: int, active: int, waits: int) -> str:
        """Cumulative series: ``lags`` loop lag samples, ``waits`` 40 ms connector waits."""
        return exposition(
            [
                Point(LOOP_LAG, {}, histogram(lags)),
                Point(LOOP_BLOCKS, {"culprit": "app.report:render"}, blocks),
                Point(LOOP_BLOCKS, {"culprit": "app.csv:export"}, 1),
                Point(LOOP_BLOCKED, {}, 0.3 * (blocks + 1)),
                Point(LOOP_TASKS, {}, 12),
                Point(HTTP_CLIENT_OPEN, {"http_connection_state": "active", **host}, active),
                Point(HTTP_CLIENT_OPEN, {"http_connection_state": "idle", **host}, 1),
                Point(AIOHTTP_LIMIT, {"scope": "total"}, 100),
                Point(AIOHTTP_LIMIT, {"scope": "per_host"}, 10),
                Point(AIOHTTP_PENDING, host, 4),
                Point(AIOHTTP_WAIT_TIME, host, histogram([0.04] * waits)),
            ]
        )

    before = parse(snapshot([0.001] * 100, 2, 3, waits=10))
    # In the next interval: 100 lag samples, 5 of them at 1.5 s: p99 interpolates in (1, 2.5]
    # to 1 + 1.5 * (99 - 95) / 5 = 2.2 s (over 1 s: critical).
    # 10 more queued requests waited 40 ms: p99 interpolates to 50 ms in (25 ms, 50 ms].
    after = parse(snapshot([0.001] * 195 + [1.5] * 5, 5, 10, waits=20))
    console = Console(record=True, width=150, force_terminal=True, color_system="standard")
    console.print(Screen("http://x/metrics", 1.0, load()).render(after, before, 1.0, None))
    text = console.export_text(clear=False)
    assert re.search(r"api\.internal:443\s+10/10\s+#{6}\s+1\s+4\s+50 ms", text)
    assert "event loop: lag p99 2200 ms   blocked 0.90s   tasks 12" in text
    assert re.search(r"5\s+\+3\s+app\.report:render", text)  # worst culprit first, +new
    assert text.index("app.report:render") < text.index("app.csv:export")
    ansi = console.export_text(styles=True)
    red, green = r"\x1b\[1;31m\s*", r"\x1b\[32m\s*"
    assert re.search(red + "2200 ms", ansi)  # lag p99 over 1 s: critical
    assert re.search(red + "10/10", ansi)  # connector at 100 % of limit_per_host: critical
    assert re.search(green + "50 ms", ansi)  # connector wait p99 under 100 ms: fine


def test_top_shows_the_anti_patterns_caught_and_the_new_ones():
    from poolwatch.cli.top import antipattern_line

    def exposition(n_plus_one: int) -> str:
        return (
            "# TYPE poolwatch_antipatterns counter\n"
            f'poolwatch_antipatterns_total{{kind="n_plus_one",culprit=""}} 0\n'
            f'poolwatch_antipatterns_total{{kind="n_plus_one",culprit="app:orders"}} {n_plus_one}\n'
            f'poolwatch_antipatterns_total{{kind="unclosed_pool",culprit=""}} 0\n'
        )

    before, after = parse(exposition(2)), parse(exposition(5))
    line = antipattern_line(after, before)
    assert line == "anti-patterns: n_plus_one 5 (+3)  (the app's log names the code)"
    assert antipattern_line(parse(exposition(0)), None) == "anti-patterns: none caught"
    assert antipattern_line(parse("poolwatch_build_info 1\n"), None) is None
