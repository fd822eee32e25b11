"""Pre-fork edge cases: the metrics port taken by another program, single-process apps started
by one parent, uvicorn --reload, the agent stopped inside a running loop, gunicorn --preload
with recycled workers, uvicorn without lifespan, and a shared directory someone else made."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.apps import REPO, start_app, stop_process
from tests.support.exporter import PYTHONPATH, start_workers, worker_pids
from tests.support.net import free_port, get, scrape, wait_for, wait_for_port
from tests.support.prefork import (
    POOL_SERIES,
    WORKERS_APP,
    app_env,
    statuses,
    try_scrape,
    workers_of,
)


def test_port_taken_by_another_program(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    bare = start_workers("uvicorn", WORKERS_APP, 2, app_env(tmp_path, bare=True))
    try:
        bare_statuses = statuses(bare)
    finally:
        bare.stop()
    app = start_workers("uvicorn", WORKERS_APP, 2, app_env(tmp_path, bare=False), metrics_port=port)
    try:
        assert statuses(app) == bare_statuses  # the app serves as it does without poolwatch
        warning = f"cannot listen on 127.0.0.1:{port} (Address already in use), and no worker"
        wait_for(lambda: warning in app.log(), timeout=10, what="the port-taken warning")
        time.sleep(2)  # the workers go on trying, every second
        assert 1 <= app.log().count(warning) <= 2, app.log()  # once per worker at most
        holder.close()  # the other program goes: a worker takes the port

        def both_workers():
            """the target shows both workers"""
            samples = try_scrape(app)
            return samples and len(workers_of(samples)) == 2

        wait_for(both_workers, timeout=10)
        assert "Traceback" not in app.log()
    finally:
        holder.close()
        app.stop()
    assert list((tmp_path / "tmp").iterdir()) == []


SPAWNED_APPS = """
import multiprocessing, os, sys
import uvicorn

def serve(port, database):
    os.environ["SA_URL"] = f"sqlite+aiosqlite:///{database}"
    uvicorn.run("tests.apps.workers_app:app", host="127.0.0.1", port=port, log_level="warning")

if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    apps = [spawn.Process(target=serve, args=(int(port), db)) for port, db in
            zip(sys.argv[1::2], sys.argv[2::2])]
    for app in apps:
        app.start()
    for app in apps:
        app.join()
"""


def test_apps_started_by_one_parent_keep_their_own_metrics(tmp_path):
    """Two single-process apps started by the same parent (here: this test, then a script
    with multiprocessing) on the same metrics port: the first serves its own series, without
    a `worker` label; the second says once that the port is taken, and serves its app."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    env = {"POOLWATCH_METRICS_PORT": str(port), "TMPDIR": str(tmpdir)}
    metrics_url = f"http://127.0.0.1:{port}/metrics"

    def own_series_only(first: str, second_log: str) -> None:
        samples = scrape(metrics_url)
        pools = {s.labels["db_client_connection_pool_name"] for s in samples.find(POOL_SERIES)}
        assert pools == {first}
        assert not [s for s in samples.samples if "worker" in s.labels]
        assert second_log.count(f"cannot listen on 127.0.0.1:{port}") == 1, second_log

    apps = []
    try:
        for name in ("first", "second"):
            db = {"SA_URL": f"sqlite+aiosqlite:///{tmp_path}/{name}.db"}
            apps.append(start_app(WORKERS_APP, {**env, **db}, metrics=False))
            wait_for_port(port)
        assert statuses(apps[1], "/sa/query", 2) == [200, 200]
        wait_for(lambda: "cannot listen" in apps[1].log(), timeout=10)
        own_series_only("first.db", apps[1].log())
    finally:
        for app in apps:
            app.stop()

    script = tmp_path / "spawned_apps.py"
    script.write_text(SPAWNED_APPS)
    ports = [free_port(), free_port()]
    args = [str(ports[0]), str(tmp_path / "first.db"), str(ports[1]), str(tmp_path / "second.db")]
    log_path = tmp_path / "spawned.log"
    with open(log_path, "w") as log:
        parent = subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,  # its spawned apps are stopped with it, as one group
        )
    try:
        for app_port in ports:
            wait_for_port(app_port, proc=parent)
        for app_port in ports:
            get(f"http://127.0.0.1:{app_port}/sa/query")
        wait_for(lambda: "cannot listen" in log_path.read_text(), timeout=10)
        first = "first.db" if "first.db" in get(metrics_url) else "second.db"
        own_series_only(first, log_path.read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGTERM)  # the spawned apps and the resource tracker
        stop_process(parent)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # whatever ignored SIGTERM
    assert list(tmpdir.iterdir()) == []  # no shared directory was ever made


def test_uvicorn_reload_is_a_single_process(tmp_path):
    """uvicorn --reload runs its app in a spawned child, one at a time: single-process mode."""
    env = app_env(tmp_path, bare=False)
    app = start_app(WORKERS_APP, env, server_args=["--reload", "--reload-dir", "tests/apps"])
    try:
        samples = wait_for(lambda: try_scrape(app), timeout=10)
        assert samples.find(POOL_SERIES)
        assert not [s for s in samples.samples if "worker" in s.labels]
    finally:
        app.stop()
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_stopping_frees_the_port_without_blocking_the_loop(clean_agent):
    """The agent stopped inside a running loop (a lifespan shutdown): back in < 20 ms, the port
    free at once (an app built per test starts again on it)."""
    import poolwatch
    from poolwatch.agent import agent

    port = free_port()
    poolwatch.instrument(metrics_port=port)
    took = []
    for _ in range(3):
        agent.start()
        assert agent.metrics_url == f"http://127.0.0.1:{port}/metrics"  # not degraded
        assert "poolwatch_build_info" in await asyncio.to_thread(get, agent.metrics_url)
        started = time.perf_counter()
        agent.stop()
        took.append(time.perf_counter() - started)
    print(f"agent.stop() on the loop: {[round(t * 1e3, 2) for t in took]} ms")
    assert max(took) < 0.02, took


def test_gunicorn_preload_and_recycled_workers(tmp_path):
    """instrument() runs in the arbiter (--preload), each worker starts its agent; workers
    recycled by --max-requests leave the target and their replacements join it."""
    app = start_workers(
        "gunicorn",
        WORKERS_APP,
        2,
        app_env(tmp_path, bare=False),
        metrics_port=free_port(),
        server_args=["--preload", "--max-requests", "10"],
    )
    try:

        def workers(exclude: set[str] = frozenset()):
            """the target shows two live workers"""
            samples = try_scrape(app)
            now = workers_of(samples) if samples else set()
            return now if len(now) == 2 and not now & exclude else None

        first = wait_for(workers)

        def recycled():
            """both first workers recycled: the target shows two others"""
            for _ in range(5):
                # a worker that reached --max-requests drops a connection now and then, bare too
                with contextlib.suppress(OSError):
                    get(app.url + "/ok")
            return workers(first)

        now = wait_for(recycled, timeout=30)
        assert now <= worker_pids(app)
    finally:
        app.stop()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_uvicorn_without_lifespan(tmp_path):
    """--lifespan off: each worker joins at its first request. Nothing tells a worker that it
    stops (uvicorn ends it with a re-raised SIGTERM), so the last one's files stay, until a
    worker of the next server sweeps the directories of servers that are gone."""
    env = app_env(tmp_path, bare=False)
    tmpdir = tmp_path / "tmp"
    left: list = []
    for _ in range(2):
        app = start_workers(
            "uvicorn",
            WORKERS_APP,
            2,
            env,
            metrics_port=free_port(),
            server_args=["--lifespan", "off"],
        )
        try:

            def both_workers(app=app):
                """the target shows both workers (after requests reached each)"""
                get(app.url + "/ok")
                samples = try_scrape(app)
                return samples and workers_of(samples, "poolwatch_build_info") == worker_pids(app)

            wait_for(both_workers, timeout=20)
            assert not set(left) & set(tmpdir.iterdir())  # the last server's are swept
        finally:
            app.stop()
        left = list(tmpdir.iterdir())
        assert [p.name for p in left] == [
            f"poolwatch-{os.geteuid()}-{app.proc.pid}-{app.metrics_port}"
        ]


def test_shared_directory_taken_by_someone_else(tmp_path):
    """Someone made the server's directory before it, writable by all: the workers refuse it,
    say so once each, and the worker holding the port serves its own series; the app serves."""
    port = free_port()
    plant = f'mkdir -m 777 "$TMPDIR/poolwatch-{os.geteuid()}-$$-{port}" && exec "$0" "$@"'
    env = app_env(tmp_path, bare=False)
    app = start_workers(
        "uvicorn", WORKERS_APP, 2, env, metrics_port=port, prefix=["sh", "-c", plant]
    )
    try:
        assert statuses(app) == [200] * 6
        samples = wait_for(lambda: try_scrape(app), timeout=10)
        assert len(workers_of(samples)) == 1  # one worker, labelled
        refused = "workers' metrics are not shared: "
        wait_for(lambda: app.log().count(refused) == 2, timeout=10, what="one warning a worker")
        assert "not a private directory of this user" in app.log()
        assert "Traceback" not in app.log()
    finally:
        app.stop()


def test_shared_directory_must_be_private(tmp_path):
    from poolwatch.exporters.prefork import _private_directory

    assert _private_directory(str(tmp_path / "new")) == str(tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "new")
    for path in (shared, tmp_path / "link"):
        with pytest.raises(PermissionError):
            _private_directory(str(path))
