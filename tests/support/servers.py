"""Server binaries from Debian packages (Prometheus, Alertmanager) run on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .apps import stop_process
from .net import get, wait_for_port


@dataclass
class Server:
    """A server process started from a binary; stopped by its pid with SIGTERM, then SIGKILL."""

    proc: subprocess.Popen
    port: int
    root: str
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get_json(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return json.loads(get(f"{self.url}{path}{query}"))

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def start_server(binary: str, args: list[str], port: int, root: str, cls: type = Server) -> Any:
    """Start ``binary`` with its output in ``root``/server.log; an instance of ``cls`` once its
    port answers."""
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed (scripts/test installs it from Debian)")
    log_path = os.path.join(root, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([path, *args], stdout=log, stderr=subprocess.STDOUT)
    server = cls(proc, port, root, log_path)
    try:
        wait_for_port(port, timeout=30, proc=proc)
    except Exception:
        output = server.log()
        server.stop()
        raise RuntimeError(f"{binary} did not start:\n{output}") from None
    return server
