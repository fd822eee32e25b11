"""Issue 8: several workers, one target — real gunicorn/uvicorn workers, `poolwatch exporter`
as a real subprocess, files in a shared directory."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error

import pytest

from tests.support import planted
from tests.support.apps import REPO
from tests.support.exporter import PYTHONPATH, run_exporter, start_workers
from tests.support.net import get, wait_for

POOL_SERIES = "db_client_connection_max"


def workers_of(samples, name: str = POOL_SERIES) -> set[str]:
    return {s.labels["worker"] for s in samples.find(name)}


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_one_target_for_every_worker(server, postgres, tmp_path):
    directory = tmp_path / "multiproc"
    markers, release = tmp_path / "markers", tmp_path / "release"
    markers.mkdir()
    exporter = run_exporter("--multiproc-dir", str(directory))
    app = start_workers(
        server,
        "tests.apps.workers_app:app",
        3,
        {"POOLWATCH_MULTIPROC_DIR": str(directory), "SA_URL": postgres.dsn("postgresql+asyncpg")},
    )
    try:

        def three_workers():
            """the exporter shows 3 workers' pool series"""
            samples = exporter.scrape()
            return samples if len(workers_of(samples)) == 3 else None

        # One scrape: 3 distinct workers, each a live process of this server, each with its pool.
        samples = wait_for(three_workers)
        first = workers_of(samples)
        assert {parent_pid(int(w)) for w in first} == {app.proc.pid}
        assert samples.value("poolwatch_exporter_workers") == 3
        for worker in first:
            assert samples.value(POOL_SERIES, worker=worker) == 3  # pool_size 2 + overflow 1
            assert len(samples.find("db_client_connection_count", worker=worker)) == 2
        # Merged families: each HELP/TYPE once, and the whole text is valid for Prometheus.
        assert samples.text.count(f"# TYPE {POOL_SERIES} gauge") == 1
        assert samples.text.count("# HELP poolwatch_build_info ") == 1
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=samples.text, capture_output=True, text=True
        )
        # 1: invalid text (e.g. "second HELP line"); 3: lint findings only, here the contract's
        # semconv name db_client_connection_count ("should not have _count suffix").
        assert check.returncode in (0, 3), check.stdout + check.stderr
        assert "error" not in check.stderr, check.stderr

        # Kill one worker: its series are gone at the next scrape, its replacement appears.
        victim = sorted(first)[0]
        os.kill(int(victim), signal.SIGKILL)
        killed_at = time.monotonic()

        def victim_gone():
            """the killed worker's series are gone"""
            return victim not in workers_of(exporter.scrape())

        wait_for(victim_gone, timeout=5, interval=0.05)
        assert time.monotonic() - killed_at < 1.0  # within one (1 s) scrape interval
        assert not (directory / f"{victim}.prom").exists()
        assert not (directory / f"{victim}.lock").exists()

        def replaced():
            """a new worker replaced the killed one"""
            workers = workers_of(exporter.scrape())
            return workers if len(workers) == 3 and victim not in workers else None

        now = wait_for(replaced)
        assert len(now - first) == 1

        # Block every worker's loop: the exporter still answers, fast, with all three.
        blockers: list[threading.Thread] = []

        def block_one() -> None:
            url = f"{app.url}/block/until?marker_dir={markers}&release={release}"
            with contextlib.suppress(OSError):
                get(url, timeout=60)

        def all_blocked():
            """every worker's loop is blocked"""
            if len(blockers) < 30:
                thread = threading.Thread(target=block_one, daemon=True)
                thread.start()
                blockers.append(thread)
            return {p.name.removeprefix("blocked-") for p in markers.iterdir()} >= now

        try:
            wait_for(all_blocked, timeout=30, interval=0.2)
            time.sleep(1.5)  # blocked for longer than one publish interval
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                samples = exporter.scrape(timeout=2)
                timings.append(time.perf_counter() - started)
                assert workers_of(samples) == now
            print(f"{server}: scrape while all loops blocked: {[round(t, 4) for t in timings]} s")
            assert statistics.median(timings) < 0.1, timings
            for worker in now:  # the workers' threads keep publishing meanwhile
                age = time.time() - (directory / f"{worker}.prom").stat().st_mtime
                assert age < 2.0, (worker, age)
            assert max(timings) < 0.5, timings
        finally:
            release.touch()
            for thread in blockers:
                thread.join(timeout=30)
    finally:
        app.stop()
        exporter.stop()


def test_workers_starting_later_and_stopping_cleanly(tmp_path):
    directory = tmp_path / "mp"
    exporter = run_exporter("--multiproc-dir", str(directory))
    try:
        assert exporter.scrape().value("poolwatch_exporter_workers") == 0
        assert get(exporter.url + "/healthz") == "ok\n"
        app = start_workers(
            "uvicorn",
            "tests.apps.pool_app:app",
            2,
            {
                "POOLWATCH_MULTIPROC_DIR": str(directory),
                "SA_URL": f"sqlite+aiosqlite:///{tmp_path}/later.db",
            },
        )
        try:
            wait_for(lambda: len(workers_of(exporter.scrape())) == 2)
        finally:
            app.stop()
        # A graceful stop removes the worker's files: nothing is left behind.
        assert sorted(os.listdir(directory)) == []
        assert exporter.scrape().value("poolwatch_exporter_workers") == 0
    finally:
        assert exporter.stop() == 0
    log = exporter.log()
    assert '"event": "poolwatch exporter stopped"' in log  # SIGTERM: graceful, JSON lines


def test_exporter_token_and_bad_input(tmp_path):
    exporter = run_exporter(
        "--multiproc-dir", str(tmp_path), env={"POOLWATCH_METRICS_TOKEN": planted.METRICS_TOKEN}
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            get(exporter.url + "/metrics")
        assert denied.value.code == 401
        samples = exporter.scrape(headers={"Authorization": f"Bearer {planted.METRICS_TOKEN}"})
        assert samples.value("poolwatch_exporter_workers") == 0
        assert get(exporter.url + "/healthz") == "ok\n"  # probes need no token
    finally:
        exporter.stop()
    assert planted.METRICS_TOKEN not in exporter.log()

    missing = run_exporter(wait=False, env={"POOLWATCH_MULTIPROC_DIR": ""})
    assert missing.proc.wait(timeout=20) == 2
    assert "pass --multiproc-dir DIR or set POOLWATCH_MULTIPROC_DIR" in missing.log()

    bad = f"host=x password={planted.BAD_DSN_PASSWORD} junk"
    bad_dsn = run_exporter("--multiproc-dir", str(tmp_path), "--postgres-dsn", bad, wait=False)
    assert bad_dsn.proc.wait(timeout=20) == 2
    assert "--postgres-dsn/POOLWATCH_POSTGRES_DSN is not a valid" in bad_dsn.log()
    assert planted.BAD_DSN_PASSWORD not in bad_dsn.log()


def _unwritable_directory_app(tmp_path, strict: bool) -> subprocess.CompletedProcess:
    """The pool app on an unwritable POOLWATCH_MULTIPROC_DIR: one request, then it stops."""
    directory = tmp_path / "readonly"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o555)
    script = """
import asyncio, httpx
from asgi_lifespan import LifespanManager
from tests.apps.pool_app import app
async def main():
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            print("served", (await client.get("/ok")).text, flush=True)
asyncio.run(main())
"""
    cmd = [sys.executable, "-c", script]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        cmd = ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override", *cmd]
    env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "POOLWATCH_MULTIPROC_DIR": str(directory),
        "POOLWATCH_STRICT": "true" if strict else "false",
    }
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_unwritable_directory_the_app_serves_and_says_why_once(tmp_path):
    done = _unwritable_directory_app(tmp_path, strict=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert 'served {"ok":true}' in output
    line = f"POOLWATCH_MULTIPROC_DIR={tmp_path / 'readonly'}: cannot write there"
    assert output.count(line) == 1, output
    warning = next(text for text in output.splitlines() if line in text)
    assert "Make it a directory this process can write" in warning, output
    assert "Traceback" not in output


def test_unwritable_directory_with_strict_stops_start_up(tmp_path):
    done = _unwritable_directory_app(tmp_path, strict=True)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "served" not in output
    assert "cannot write there (Permission denied)" in output, output


def test_worker_id_taken_by_a_live_process(tmp_path):
    from poolwatch._log import errors
    from poolwatch.agent import Agent, StartupError

    first, second, strict = Agent(), Agent(), Agent()
    options = {"multiproc_dir": str(tmp_path), "worker": "web-1", "metrics_port": 0}
    for agent in (first, second):
        agent.configure(options)
    strict.configure({**options, "strict": True})
    first.start()
    try:
        before = errors.counts["exporter"]
        second.start()  # degraded: not published, counted
        assert errors.counts["exporter"] == before + 1
        second.stop()
        with pytest.raises(StartupError, match=r"POOLWATCH_WORKER=web-1: another live process"):
            strict.start()
    finally:
        first.stop()
    strict.start()  # free again once the first stopped
    strict.stop()


def test_stale_file_of_a_live_worker_is_skipped(tmp_path):
    from poolwatch.exporters.multiproc import Publisher, WorkersCollector

    text = b'# HELP up_x x\n# TYPE up_x gauge\nup_x{worker="w"} 1.0\n'
    publisher = Publisher(str(tmp_path), "w", lambda: text, interval=3600)
    try:
        collector = WorkersCollector(str(tmp_path), stale_after=10)
        wait_for(lambda: (tmp_path / "w.prom").exists(), timeout=5)
        assert [f.name for f in collector.collect()] == ["poolwatch_exporter_workers", "up_x"]
        old = time.time() - 20
        os.utime(tmp_path / "w.prom", (old, old))  # the worker stopped rewriting its file
        families = list(collector.collect())
        assert [f.name for f in families] == ["poolwatch_exporter_workers"]
        assert families[0].samples[0].value == 0
    finally:
        publisher.stop()


def test_a_forked_child_does_not_keep_a_dead_worker_alive(tmp_path):
    """The lock dies with the worker even when the app forked a child that lives on."""
    from poolwatch.exporters.multiproc import live_files

    script = f"""
import os, sys, time
from poolwatch.exporters.multiproc import Publisher
Publisher({str(tmp_path)!r}, "parent", lambda: b"x_up 1.0\\n")
if os.fork() == 0:
    time.sleep(30)
    os._exit(0)
print("ready", flush=True)
time.sleep(30)
"""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    child_pid = None
    try:
        assert proc.stdout.readline() == "ready\n"
        wait_for(lambda: [s for s, _ in live_files(str(tmp_path))] == ["parent"], timeout=5)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = f.read().split()
        child_pid = int(children[0])
        proc.kill()
        proc.wait(timeout=5)
        assert os.path.exists(f"/proc/{child_pid}")  # the forked child still runs
        wait_for(lambda: list(live_files(str(tmp_path))) == [], timeout=5)
    finally:
        proc.kill()
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
