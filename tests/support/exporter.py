"""``poolwatch exporter`` as a real subprocess, and pre-fork app servers with several workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from . import planted
from .apps import REPO, AppServer, stop_process
from .net import free_port, scrape, wait_for_port

PYTHONPATH = os.pathsep.join([REPO, os.path.join(REPO, "agent")])


@dataclass
class Exporter:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scrape(self, **kwargs):
        return scrape(self.url + "/metrics", **kwargs)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        return stop_process(self.proc)


def _log_file(prefix: str) -> str:
    log = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log", delete=False)  # noqa: SIM115
    log.close()
    planted.watch_file(log.name, "the log of")
    return log.name


def start_poolwatch(
    args: list[str],
    env: dict[str, str],
    port: int,
    log_path: str,
    *,
    wait: bool = True,
    prefix: list[str] | None = None,
) -> Exporter:
    """``poolwatch ARGS`` with exactly ``env``, its output in ``log_path``; waits until it
    listens on ``port`` unless ``wait=False``; ``prefix`` goes before the command."""
    cmd = [*(prefix or []), sys.executable, "-m", "poolwatch", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    exporter = Exporter(proc, port, log_path)
    if wait:
        try:
            wait_for_port(port, proc=proc)
        except Exception:
            exporter.stop()
            raise RuntimeError(f"poolwatch {args[0]} did not start:\n{exporter.log()}") from None
    return exporter


def run_exporter(
    *args: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    prefix: list[str] | None = None,
) -> Exporter:
    """``poolwatch exporter --port <free> ARGS``; waits until it listens unless ``wait=False``;
    ``prefix`` goes before the command."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})}
    return start_poolwatch(
        ["exporter", "--port", str(port), *args],
        full_env,
        port,
        _log_file("poolwatch-exporter-"),
        wait=wait,
        prefix=prefix,
    )


class WorkersServer(AppServer):
    """A server with worker processes, in its own process group so that none outlives it."""

    def stop(self) -> None:
        # SIGTERM: graceful for both servers (gunicorn 27 with uvicorn workers waits out its
        # whole graceful timeout on SIGINT, then a killed master would orphan the workers).
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        self.proc.wait(timeout=5)


def worker_pids(server: AppServer) -> set[str]:
    """The pids of a pre-fork server's workers: its children, but multiprocessing's resource
    tracker (uvicorn's and hypercorn's spawned workers come with one)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    workers = set()
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"resource_tracker" not in f.read():
                workers.add(child)
    return workers


def start_workers(
    server: str,
    target: str,
    workers: int,
    env: dict[str, str],
    *,
    metrics_port: int = 0,
    server_args: list[str] | None = None,
    prefix: list[str] | None = None,
) -> AppServer:
    """``target`` under gunicorn with uvicorn workers, ``uvicorn --workers`` or hypercorn
    ``--workers``, POOLWATCH_METRICS_PORT=``metrics_port`` (0: off); ``prefix`` goes before
    the command."""
    port = free_port()
    bind = ["127.0.0.1", str(port)]
    if server == "gunicorn":
        cmd = [
            *(sys.executable, "-m", "gunicorn", target, "-k", "uvicorn_worker.UvicornWorker"),
            *("-w", str(workers), "-b", ":".join(bind), "--log-level", "warning"),
        ]
    elif server == "hypercorn":
        cmd = [
            *(sys.executable, "-m", "hypercorn", target, "--workers", str(workers)),
            *("--bind", ":".join(bind), "--log-level", "warning"),
        ]
    else:
        cmd = [
            *(sys.executable, "-m", "uvicorn", target, "--workers", str(workers)),
            *("--host", bind[0], "--port", bind[1], "--log-level", "warning"),
        ]
    cmd = [*(prefix or []), *cmd, *(server_args or [])]
    full_env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "POOLWATCH_METRICS_PORT": str(metrics_port),
        **env,
    }
    log_path = _log_file(f"poolwatch-{server}-")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    app = WorkersServer(proc, port, metrics_port, log_path, full_env)
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        app.stop()
        raise RuntimeError(f"{server} did not start:\n{app.log()}") from None
    return app
