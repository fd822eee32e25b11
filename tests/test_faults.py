"""Issue 11: upstream and exporter faults — the app sees what it would see without poolwatch.

Upstream faults run the same FastAPI app (``tests/apps/aiohttp_app.py``) under real uvicorn twice,
without poolwatch (``TEST_APP_BARE=1``) and with it, against real aiohttp upstreams on loopback,
and compare what the app's route reports. The upstream URLs carry planted credentials: the
suite's secret scan (``tests/support/planted.py``) checks every output of these scenarios too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import aiohttp

from tests.support import planted
from tests.support.apps import without_root_writes
from tests.support.exporter import run_exporter
from tests.support.net import free_port, get, wait_for
from tests.support.planted import with_credentials
from tests.support.upstream import Upstream, UpstreamProcess, conns, host

APP = "tests.apps.aiohttp_app:app"
OK = '{"ok": true}'  # what the upstream answers
OPEN = "http_client_open_connections"
ERRORS = "aiohttp_client_errors_total"
AGENT_ERRORS = "poolwatch_agent_errors_total"


async def fetch(url: str) -> tuple[dict, float]:
    """GET ``url`` from a plain client: the JSON body and how long it took."""
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client,
        client.get(url) as response,
    ):
        planted.scan(await response.text(), f"the app's answer to {url}")  # error messages
        return await response.json(), time.perf_counter() - started


def assert_quiet(server) -> None:
    """Nothing of poolwatch's own went wrong: no hook failure counted or logged, no traceback."""
    assert server.scrape().value(AGENT_ERRORS, probe="aiohttp") == 0
    log = server.log()
    assert "poolwatch hook failed" not in log and "Traceback" not in log, log


# --- upstream killed mid-request -------------------------------------------------------------
async def _kill_mid_request(app_server, port: int, bare: bool):
    """Four requests (two GET, two POST) held by an upstream that is then SIGKILLed; afterwards
    the upstream comes back on the same port and the app calls it again."""
    upstream = UpstreamProcess(port)
    env = {
        "UPSTREAM_GET": with_credentials(upstream.url(60)),
        "UPSTREAM_POST": with_credentials(upstream.url(60)),
        "METHOD_POST": "POST",
        "UPSTREAM_AGAIN": with_credentials(upstream.url(0)),
    }
    server = app_server(APP, {**env, "TEST_APP_BARE": "1" if bare else "0"}, metrics=not bare)
    calls = [
        asyncio.create_task(fetch(f"{server.url}/call/{name}"))
        for name in ("get", "get", "post", "post")
    ]
    try:
        await asyncio.to_thread(upstream.wait_requests, 4)  # all four are in flight
        during = None if bare else await asyncio.to_thread(server.scrape)
    finally:
        upstream.kill()
    results = [body for body, _ in await asyncio.gather(*calls)]
    upstream = UpstreamProcess(port)
    try:
        again, _ = await fetch(f"{server.url}/call/again")
        after = None if bare else await asyncio.to_thread(server.scrape)
    finally:
        upstream.kill()
    return server, results, again, during, after


async def test_upstream_killed_mid_request(app_server):
    port = free_port()  # one port for both runs: the same error messages
    bare, bare_results, bare_again, *_ = await _kill_mid_request(app_server, port, bare=True)
    bare.stop()
    server, results, again, during, after = await _kill_mid_request(app_server, port, bare=False)

    # what aiohttp raises without poolwatch: a POST gets the disconnection; a GET is retried once
    # by aiohttp (idempotent), and that retry is refused or reset depending on how far the
    # kernel got in closing the dead process's sockets: a race of its own, in both runs
    retried = {"aiohttp.client_exceptions." + k for k in ("ClientConnectorError", "ClientOSError")}
    for run in (bare_results, results):
        assert {r["error"] for r in run[:2]} <= retried, run
    assert results[2:] == bare_results[2:]  # the same exception, the same message
    assert [r["error"] for r in results[2:]] == [
        "aiohttp.client_exceptions.ServerDisconnectedError"
    ] * 2
    assert again["body"] == bare_again["body"] == OK  # the app goes on serving that host
    # the requests were in flight, then each failure the app saw is counted under its type
    assert during.value(OPEN, **conns("active", port)) == 4
    seen = Counter(r["error"].rsplit(".", 1)[1] for r in results)
    counted = {s.labels["error_type"]: s.value for s in after.find(ERRORS, **host(port))}
    assert counted == seen
    assert after.value(OPEN, **conns("active", port)) == 0
    assert after.value(OPEN, **conns("idle", port)) == 1  # the connection of the last call
    assert_quiet(server)


# --- slow upstream: a timeout shorter than its answer, and one longer -------------------------
async def _slow_calls(app_server, upstream: Upstream, bare: bool):
    """The upstream answers after 2 s: two calls give up after 0.5 s, one waits up to 10 s."""
    slow = with_credentials(f"{upstream.url}/slow?delay=2")
    env = {
        "UPSTREAM_SHORT": slow,
        "TIMEOUT_SHORT": "0.5",
        "UPSTREAM_LONG": slow,
        "TIMEOUT_LONG": "10",
    }
    server = app_server(APP, {**env, "TEST_APP_BARE": "1" if bare else "0"}, metrics=not bare)
    names = ("short", "short", "long")
    results = await asyncio.gather(*(fetch(f"{server.url}/call/{name}") for name in names))
    return server, results


async def test_slow_upstream_times_out_as_without_poolwatch(app_server):
    with Upstream() as upstream:
        bare, bare_results = await _slow_calls(app_server, upstream, bare=True)
        bare.stop()
        server, results = await _slow_calls(app_server, upstream, bare=False)
        after = server.scrape()

    timeout = {"error": "builtins.TimeoutError", "message": ""}  # aiohttp's total timeout
    assert [body for body, _ in bare_results[:2]] == [timeout] * 2, bare_results
    assert [body for body, _ in results[:2]] == [timeout] * 2, results
    # the short timeout still fires on time (0.5 s, not the upstream's 2 s); the long one waits
    assert all(elapsed < 1.5 for _, elapsed in results[:2]), results
    (long, elapsed), (bare_long, _) = results[2], bare_results[2]
    assert long["body"] == bare_long["body"] == OK and elapsed >= 2
    # both timeouts are counted under the host; their connections were closed, none is active
    assert after.value(ERRORS, error_type="TimeoutError", **host(upstream.port)) == 2
    assert after.value(OPEN, **conns("active", upstream.port)) == 0
    assert after.value(OPEN, **conns("idle", upstream.port)) == 1  # the long call's, kept alive
    assert_quiet(server)


# --- exporter faults ----------------------------------------------------------------------------
# The matrix (docs/how-it-works.md): OTLP collector down -> test_otlp (in-app; the sidecar pushes no
# OTLP); metrics port taken -> test_pools (in-app, with lifespan) and below; multiproc directory
# unwritable at start -> test_multiproc (in-app) and below; the rest below.
POOL_APP = "tests.apps.pool_app:app"


def test_metrics_port_taken_without_lifespan_serves_the_app_and_says_why(app_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no lifespan: no start-up to fail, the agent starts on the first request instead
        server = app_server(
            POOL_APP, {"POOLWATCH_METRICS_PORT": str(port)}, metrics=False,
            server_args=["--lifespan", "off"],
        )  # fmt: skip
        for _ in range(20):
            assert get(server.url + "/ok") == '{"ok":true}'
    log = server.log()
    assert log.count(f"POOLWATCH_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}") == 1, log
    assert "Choose a free port" in log


def test_sidecar_metrics_port_taken_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = run_exporter("--multiproc-dir", str(tmp_path), "--port", str(port), wait=False)
        assert exporter.proc.wait(timeout=20) == 2
    assert exporter.log() == (
        f"poolwatch exporter: --port/POOLWATCH_METRICS_PORT={port}: cannot listen on "
        f"127.0.0.1:{port} (Address already in use); choose a free port\n"
    )


def test_sidecar_directory_unusable_is_one_clear_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    exporter = run_exporter("--multiproc-dir", f"{not_a_dir}/metrics", wait=False)
    assert exporter.proc.wait(timeout=20) == 2
    log = exporter.log()
    assert log.startswith(
        f"poolwatch exporter: --multiproc-dir/POOLWATCH_MULTIPROC_DIR={not_a_dir}/metrics: "
        "cannot read it (Not a directory); give a directory this process can read and write"
    ), log
    assert log.count("\n") == 1


def test_sidecar_on_a_read_only_directory_serves_the_live_workers(tmp_path):
    """The sidecar only reads; a dead worker's files it cannot remove are skipped, logged once."""
    from poolwatch.exporters.multiproc import Publisher

    text = b'# HELP up_x x\n# TYPE up_x gauge\nup_x{worker="live"} 1.0\n'
    live = Publisher(str(tmp_path), "live", lambda: text)  # this process: it may write
    (tmp_path / "dead.lock").write_text("")  # a worker that died without cleaning up
    (tmp_path / "dead.prom").write_text('up_x{worker="dead"} 1.0\n')
    tmp_path.chmod(0o555)
    try:
        exporter = run_exporter("--multiproc-dir", str(tmp_path), prefix=without_root_writes())
        try:
            for _ in range(3):
                samples = exporter.scrape()
                assert samples.value("poolwatch_exporter_workers") == 1
                assert [s.labels["worker"] for s in samples.find("up_x")] == ["live"]
            assert get(exporter.url + "/healthz") == "ok\n"
        finally:
            assert exporter.stop() == 0
    finally:
        tmp_path.chmod(0o755)
        live.stop()
    log = exporter.log()
    assert (tmp_path / "dead.prom").exists()  # it could not remove it...
    assert log.count("poolwatch hook failed") == 1 and "PermissionError" in log, log  # ...once


def test_multiproc_directory_unwritable_while_running_degrades_and_recovers(app_server, tmp_path):
    """Start-up checks the directory; if it turns read-only later, the app goes on serving, the
    failed writes are counted and logged once, the sidecar skips the stale file, and everything
    is back once the directory is writable again."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {"POOLWATCH_MULTIPROC_DIR": str(directory), "POOLWATCH_WORKER": "web-1"}
    server = app_server(POOL_APP, env, metrics=False, prefix=without_root_writes())
    exporter = run_exporter("--multiproc-dir", str(directory), "--stale-after", "2")
    try:

        def workers() -> float:
            return exporter.scrape().value("poolwatch_exporter_workers")

        wait_for(lambda: workers() == 1, 15, "worker in the sidecar")
        directory.chmod(0o555)
        try:
            wait_for(lambda: workers() == 0, 15, "stale worker skipped")
            for _ in range(20):
                assert get(server.url + "/ok") == '{"ok":true}'
        finally:
            directory.chmod(0o755)
        samples = wait_for(
            lambda: (s := exporter.scrape()).value("poolwatch_exporter_workers") == 1 and s,
            15,
            "worker back in the sidecar",
        )
        failed = samples.value("poolwatch_agent_errors_total", probe="exporter", worker="web-1")
        assert failed >= 2  # one failed write a second, each counted
    finally:
        assert exporter.stop() == 0
    log = server.log()
    assert log.count("poolwatch hook failed") == 1 and "PermissionError" in log, log
