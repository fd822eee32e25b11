"""Pre-fork servers with the one-liner alone: real uvicorn/gunicorn/hypercorn workers, one
target on POOLWATCH_METRICS_PORT for all of them, no sidecar, no variable but the port; through
killed workers and blocked loops, the app's clients see what they see without poolwatch. The
edge cases (a taken port, apps of one parent, reload, stopping, preload, no lifespan, the
shared directory): test_prefork_edges.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import threading
import time

import pytest

from tests.support.exporter import start_workers, worker_pids
from tests.support.net import free_port, get, wait_for
from tests.support.prefork import (
    POOL_SERIES,
    WORKERS_APP,
    app_env,
    statuses,
    try_scrape,
    workers_of,
)


def serving_worker(app) -> str:
    """The worker serving the target, as the workers' log lines say (the latest line wins)."""
    found = re.findall(r"(?:served_by=|now serves /metrics.* worker=)(\d+)", app.log())
    assert found, app.log()
    return found[-1]


def block_every_loop(app, markers, release, workers: set[str]) -> list[threading.Thread]:
    """Requests to /block/until until every worker in ``workers`` has its loop blocked."""
    blockers: list[threading.Thread] = []

    def block_one() -> None:
        with contextlib.suppress(OSError):
            get(f"{app.url}/block/until?marker_dir={markers}&release={release}", timeout=60)

    def all_blocked():
        """every worker's loop is blocked"""
        if len(blockers) < 30:
            thread = threading.Thread(target=block_one, daemon=True)
            thread.start()
            blockers.append(thread)
        return {p.name.removeprefix("blocked-") for p in markers.iterdir()} >= workers

    wait_for(all_blocked, timeout=30, interval=0.2)
    return blockers


def replaced_in_target(app, victim: str, workers: int, directory) -> set[str]:
    """After SIGKILL of ``victim``: its series leave the target, a replacement's come."""
    killed_at = time.monotonic()

    def victim_gone():
        """the target answers without the killed worker's series"""
        samples = try_scrape(app)
        return samples is not None and victim not in workers_of(samples)

    wait_for(victim_gone, timeout=10, interval=0.05)
    print(
        f"killed worker {victim}: gone from the target after {time.monotonic() - killed_at:.2f} s"
    )

    def replaced():
        """a replacement worker's series are in the target"""
        samples = try_scrape(app)
        now = workers_of(samples) if samples else set()
        return now if len(now) == workers and victim not in now else None

    live = wait_for(replaced, timeout=30)
    assert live <= worker_pids(app)
    # the next live worker removes the files the killed one left behind
    wait_for(lambda: not list(directory.glob(f"{victim}.*")), timeout=10, what="files removed")
    return live


def replaced_bare(app, victim: str, workers: int) -> set[str]:
    def replaced():
        """the server replaced the killed worker"""
        now = worker_pids(app)
        return now if len(now) == workers and victim not in now else None

    return wait_for(replaced, timeout=30)


def run_faults(server: str, workers: int, tmp_path, bare: bool, kills: bool) -> list:
    """SIGKILL a worker, SIGKILL the serving one, block every loop; with poolwatch, check the
    target at each step. Returns what the app's clients saw, to compare with the bare app."""
    seen: list = []
    markers, release = tmp_path / f"markers-{bare}", tmp_path / f"release-{bare}"
    markers.mkdir()
    env = app_env(tmp_path, bare)
    app = start_workers(server, WORKERS_APP, workers, env, metrics_port=0 if bare else free_port())
    try:
        seen.append(("start", statuses(app)))
        if bare:
            live = wait_for(lambda: len(pids := worker_pids(app)) == workers and pids)
        else:

            def every_worker():
                """the target shows every worker's series"""
                samples = try_scrape(app)
                return samples if samples and len(workers_of(samples)) == workers else None

            samples = wait_for(every_worker)
            live = workers_of(samples)
            assert live <= worker_pids(app)  # each a live worker of this very server
            assert samples.value("poolwatch_exporter_workers") == workers
            assert samples.text.count(f"# TYPE {POOL_SERIES} gauge") == 1
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=samples.text, capture_output=True, text=True
            )
            assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: lint only
            assert "error" not in check.stderr, check.stderr
            (directory,) = (tmp_path / "tmp").iterdir()
            assert directory.name == f"poolwatch-{os.geteuid()}-{app.proc.pid}-{app.metrics_port}"
            assert directory.stat().st_mode & 0o777 == 0o700

        if kills:  # a worker that does not serve, then the serving one, without a goodbye
            serving = sorted(live)[-1] if bare else serving_worker(app)
            for victim in (sorted(live - {serving})[0], serving):
                os.kill(int(victim), signal.SIGKILL)
                if bare:
                    live = replaced_bare(app, victim, workers)
                else:
                    live = replaced_in_target(app, victim, workers, directory)
                seen.append(("killed a worker", statuses(app)))

        # Every worker's loop blocked: the target answers at once, with every worker.
        blockers = block_every_loop(app, markers, release, live)
        try:
            if not bare:
                time.sleep(1.5)  # blocked for longer than a publish interval
                timings = []
                for _ in range(5):
                    started = time.perf_counter()
                    samples = app.scrape(timeout=2)
                    timings.append(time.perf_counter() - started)
                    assert workers_of(samples) == live
                print(f"{server}: scrapes while every loop is blocked: {timings}")
                assert statistics.median(timings) < 0.1, timings
        finally:
            release.touch()
            for thread in blockers:
                thread.join(timeout=30)
        seen.append(("loops were blocked", statuses(app)))
    finally:
        app.stop()
    # Nothing left behind in the temporary directory, not even by the killed workers.
    leftovers = list((tmp_path / ("tmp-bare" if bare else "tmp")).iterdir())
    assert leftovers == [], (leftovers, app.log())
    assert "Traceback" not in app.log(), app.log()
    return seen


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_three_workers_one_target_through_kills_and_blocks(server, tmp_path):
    with_poolwatch = run_faults(server, 3, tmp_path, bare=False, kills=True)
    bare = run_faults(server, 3, tmp_path, bare=True, kills=True)
    assert with_poolwatch == bare  # the app's clients see the same, with poolwatch or without


def test_hypercorn_two_workers_one_target(tmp_path):
    # hypercorn replaces no dead worker (its parent stops the server when one dies): no kills.
    with_poolwatch = run_faults("hypercorn", 2, tmp_path, bare=False, kills=False)
    bare = run_faults("hypercorn", 2, tmp_path, bare=True, kills=False)
    assert with_poolwatch == bare
