"""Issue 4: event-loop lag, blocks and their culprit, under uvicorn with uvloop and asyncio."""

from __future__ import annotations

import asyncio
import http.server
import re
import threading
import time

import pytest
import structlog

import poolwatch
from poolwatch.agent import agent
from poolwatch.metrics import AGENT_ERRORS, LOOP_BLOCKED, LOOP_BLOCKS, LOOP_LAG, LOOP_TASKS
from poolwatch.probes.loop import APP, LIBRARY, STDLIB, code_kind
from tests.support.load import burst
from tests.support.net import Samples, free_port, get, wait_for_port

LOOPS = ["uvloop", "asyncio"]
CULPRIT = "tests.apps.loop_app:slow_helper"
BUCKETS = "asyncio_event_loop_lag_seconds_bucket"


def blocks(samples: Samples) -> dict[str, float]:
    return {s.labels["culprit"]: s.value for s in samples.find("asyncio_event_loop_blocks_total")}


def lag_over(samples: Samples, le: str) -> float:
    """Lag samples above the bucket ``le``."""
    total = samples.value("asyncio_event_loop_lag_seconds_count")
    return total - samples.bucket("asyncio_event_loop_lag_seconds", le)


def wait_for(read, ok, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(params=LOOPS)
def loop_app(request, app_server):
    return app_server("tests.apps.loop_app:app", server_args=["--loop", request.param])


def test_blocks_are_counted_timed_and_named(loop_app):
    ended: list[float] = []

    def call_slow() -> None:
        get(f"{loop_app.url}/slow?seconds=0.3")
        ended.append(time.monotonic())

    for i in range(3):
        started = time.monotonic()
        request = threading.Thread(target=call_slow)
        request.start()
        if i == 1:  # a scrape while the loop is blocked answers from the listener's thread
            time.sleep(0.12)
            before = time.monotonic()
            during = loop_app.scrape(timeout=1)
            after = time.monotonic()
        request.join(timeout=10)
        assert len(ended) == i + 1
        if i == 1:
            assert before - started > 0.1 and after < ended[-1], "the scrape was inside the block"
            assert after - before < 0.1, f"/metrics took {after - before:.3f}s during a block"
            assert during.value("poolwatch_build_info", version=poolwatch.__version__) == 1

    samples = wait_for(loop_app.scrape, lambda s: sum(blocks(s).values()) >= 3)
    assert blocks(samples) == {CULPRIT: 3, "other": 0}
    assert lag_over(samples, "0.25") >= 3
    assert samples.value("asyncio_event_loop_blocked_seconds_total") == pytest.approx(0.9, abs=0.1)
    assert samples.value("poolwatch_agent_errors_total", probe="loop") == 0

    log = re.sub(r"\x1b\[[0-9;]*m", "", loop_app.log())  # no colour codes, whatever the renderer
    warnings = [line for line in log.splitlines() if "event loop blocked" in line]
    assert len(warnings) == 3, log
    for line in warnings:
        assert f"culprit={CULPRIT}" in line
        assert "GET /slow" in line  # the route template of the blocked request
        assert 0.28 <= float(re.search(r"duration_s=([0-9.]+)", line)[1]) <= 0.32, line
        assert "tests.apps.loop_app:slow:" in line  # the short stack names the caller too


def test_healthy_load_has_no_block_and_low_lag(loop_app):
    before = loop_app.scrape()

    async def load() -> None:
        for _ in range(25):
            assert set(await burst(f"{loop_app.url}/ok", 40)) == {200}

    started = time.monotonic()
    asyncio.run(load())
    took = time.monotonic() - started
    after = loop_app.scrape()

    assert blocks(after) == {"other": 0}
    assert after.value("asyncio_event_loop_blocked_seconds_total") == 0
    count = after.value("asyncio_event_loop_lag_seconds_count") - before.value(
        "asyncio_event_loop_lag_seconds_count"
    )
    assert count >= took / 0.01 / 3, "the lag probe kept ticking under load"
    # p99 of the lag during the load: 99 % of its samples at or under 50 ms (threshold: 100 ms)
    under_50ms = after.bucket("asyncio_event_loop_lag_seconds", "0.05") - before.bucket(
        "asyncio_event_loop_lag_seconds", "0.05"
    )
    assert under_50ms >= 0.99 * count


def test_tasks_gauge_counts_pending_tasks(loop_app):
    idle = loop_app.scrape().value("asyncio_tasks")
    get(f"{loop_app.url}/spawn?n=200&seconds=2.5")
    busy = wait_for(loop_app.scrape, lambda s: s.value("asyncio_tasks") >= 200, timeout=2)
    assert busy.value("asyncio_tasks") >= idle + 200
    done = wait_for(loop_app.scrape, lambda s: s.value("asyncio_tasks") < 200, timeout=5)
    assert done.value("asyncio_tasks") < 200


# --- in-process: watch_event_loop(), stopping, settings, failures ------------------------------


def run(loop_name: str, main) -> None:
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def points(metric) -> dict:
    return {
        tuple(p.attributes.values()): p.value
        for p in agent.registry.collect()
        if p.metric is metric
    }


def poolwatch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("poolwatch")]


@pytest.fixture
def clean_agent():
    yield agent
    poolwatch.uninstrument()


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


def fetch_report(url: str) -> int:
    import httpx

    return httpx.get(url).status_code  # a sync HTTP client on the loop: the classic block


@pytest.mark.parametrize("loop_name", LOOPS)
def test_watch_event_loop_names_the_app_frame_above_a_library(loop_name, clean_agent):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{upstream.server_port}/report"
    took: list[float] = []

    async def main() -> None:
        stop = poolwatch.watch_event_loop()
        assert "poolwatch-loop-watchdog" in poolwatch_threads()
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        assert fetch_report(url) == 200
        took.append(time.perf_counter() - started)
        await asyncio.sleep(0.2)
        stop()

    try:
        with structlog.testing.capture_logs() as logs:
            run(loop_name, main)
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert poolwatch_threads() == []
    assert points(LOOP_LAG) == {}, "a stopped watcher leaves the registry"
    [warning] = [entry for entry in logs if entry["event"] == "event loop blocked"]
    assert warning["culprit"] == "tests.test_loop:fetch_report"
    assert "httpx" in warning["frames"] and "route" not in warning
    assert warning["duration_s"] == pytest.approx(took[0], abs=0.01)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tasks_blocks_cap_and_threshold_settings(loop_name, clean_agent, monkeypatch):
    monkeypatch.setenv("POOLWATCH_MAX_CULPRITS", "2")
    monkeypatch.setenv("POOLWATCH_BLOCK_THRESHOLD", "0.05")

    def first() -> None:
        time.sleep(0.12)

    def second() -> None:
        time.sleep(0.12)

    def third() -> None:
        time.sleep(0.12)

    async def main() -> None:
        stop = poolwatch.watch_event_loop()
        tasks = [asyncio.create_task(asyncio.sleep(2)) for _ in range(100)]
        await asyncio.sleep(1.1)  # the task count is sampled once a second
        assert points(LOOP_TASKS)[()] >= 100
        for blocker in (first, second, third, first):
            blocker()
            await asyncio.sleep(0.02)
        time.sleep(0.03)  # 30 ms: under the 50 ms threshold, not a block
        await asyncio.sleep(0.2)
        assert points(LOOP_BLOCKS) == {
            ("other",): 1,  # third: beyond POOLWATCH_MAX_CULPRITS=2
            ("tests.test_loop:test_tasks_blocks_cap_and_threshold_settings.<locals>.first",): 2,
            ("tests.test_loop:test_tasks_blocks_cap_and_threshold_settings.<locals>.second",): 1,
        }
        assert points(LOOP_BLOCKED)[()] == pytest.approx(0.48, abs=0.04)
        for task in tasks:
            task.cancel()
        stop()

    run(loop_name, main)
    assert poolwatch_threads() == []


def test_errors_inside_the_probe_are_counted_not_raised(clean_agent, monkeypatch):
    def broken(loop=None):
        raise RuntimeError("boom")

    async def main() -> None:
        stop = poolwatch.watch_event_loop()
        await asyncio.sleep(0.3)
        monkeypatch.setattr(asyncio, "all_tasks", broken)  # the probe's task count now fails
        await asyncio.sleep(1.2)
        monkeypatch.undo()
        count_before = points(LOOP_LAG)[()].count
        await asyncio.sleep(0.2)
        assert points(LOOP_LAG)[()].count > count_before, "the lag probe kept ticking"
        stop()

    before = points(AGENT_ERRORS)[("loop",)]
    run("asyncio", main)
    assert points(AGENT_ERRORS)[("loop",)] > before


@pytest.mark.parametrize("loop_name", LOOPS)
def test_probe_and_watchdog_start_and_stop_with_the_app(loop_name, clean_agent):
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    poolwatch.instrument(app, metrics_port=free_port())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop=loop_name, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for_port(port)
        assert get(f"http://127.0.0.1:{port}/ok") == '{"ok":true}'
        assert sorted(poolwatch_threads()) == ["poolwatch-loop-watchdog", "poolwatch-metrics"]
        metrics = wait_for(
            lambda: Samples(get(f"http://127.0.0.1:{agent.metrics_port}/metrics")),
            lambda s: s.value("asyncio_event_loop_lag_seconds_count") > 5,
        )
        assert metrics.value("asyncio_event_loop_lag_seconds_count") > 5
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert poolwatch_threads() == []


def test_culprit_rule():
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    none: frozenset[str] = frozenset()
    assert code_kind(f"{stdlib}/asyncio/events.py", "asyncio.events", none) == STDLIB
    assert code_kind("<frozen importlib._bootstrap>", "importlib._bootstrap", none) == STDLIB
    site = "/srv/venv/lib/python3.11/site-packages"
    assert code_kind(f"{site}/starlette/routing.py", "starlette.routing", none) == LIBRARY
    assert code_kind("/usr/lib/python3/dist-packages/requests/api.py", "requests.api", none) == (
        LIBRARY
    )
    assert code_kind(f"{site}/poolwatch/asgi.py", "poolwatch.asgi", none) == STDLIB
    assert code_kind("/srv/app/main.py", "main", none) == APP
    # an app installed into site-packages is recognised by the package that called instrument()
    assert code_kind(f"{site}/shop/db.py", "shop.db", frozenset({"shop"})) == APP
    assert code_kind(f"{site}/shop/db.py", "shop.db", none) == LIBRARY
