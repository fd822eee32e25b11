"""Real uvicorn (or gunicorn) servers running test apps in subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from . import planted
from .net import free_port, scrape, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Ask ``proc`` to stop with ``sig``; kill it after 10 s. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def without_root_writes() -> list[str]:
    """A command prefix under which a root process obeys directory permissions when writing
    (root bypasses them through CAP_DAC_OVERRIDE); nothing for other users."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override"]


@dataclass
class AppServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self, **kwargs):
        return scrape(self.metrics_url, **kwargs)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)


def start_app(
    target: str,
    env: dict[str, str] | None = None,
    *,
    server_args: list[str] | None = None,
    metrics: bool = True,
    wait_metrics: bool = True,
    prefix: list[str] | None = None,
) -> AppServer:
    """``target`` is ``module:attr`` (e.g. ``tests.apps.pool_app:app``) served by uvicorn;
    ``prefix`` goes before the command (e.g. ``without_root_writes()``); a variable given as
    None in ``env`` is left unset."""
    port, metrics_port = free_port(), free_port()
    full_env = {
        **os.environ,
        # this checkout's package first, whatever is installed in the environment
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "agent")]),
        "POOLWATCH_METRICS_PORT": str(metrics_port if metrics else 0),
    }
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: leave it unset
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the app's log outlives this function
        prefix="poolwatch-app-", suffix=".log", delete=False
    )
    planted.watch_file(log.name, "the log of")
    cmd = [
        *(prefix or []),
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *(server_args or []),
    ]
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    server = AppServer(proc, port, metrics_port, log.name, full_env)
    try:
        wait_for_port(port, proc=proc)
        if metrics and wait_metrics:
            wait_for_port(metrics_port, proc=proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"app {target} did not start:\n{server.log()}") from None
    return server
