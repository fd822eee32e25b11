"""A real Prometheus server (Debian package) scraping loopback targets, and its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .net import free_port, wait_for_port


class PromQLError(RuntimeError):
    """Prometheus rejected a query (bad syntax, type error, ...)."""


@dataclass
class Prometheus:
    proc: subprocess.Popen
    port: int
    root: Path
    log: IO[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str | list[str]) -> object:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: the body says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step)
        )
        return data["result"]

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        return self.api("series", **{"match[]": match, "start": f"{start}", "end": f"{end}"})

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def wait_for_targets(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` targets are up (the first scrape comes ~5 s after start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = self.query("up == 1")
            if len(up) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} targets not up after {timeout}s: {self.api('targets')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_ready(server: Prometheus, timeout: float) -> None:
    """The API answers 503 until the TSDB is open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"prometheus not ready after {timeout}s")


def start_prometheus(
    targets: list[str], job: str, labels: dict[str, str] | None = None
) -> Prometheus:
    """Scrapes ``targets`` (host:port of /metrics) every second as ``job``, with extra target
    ``labels`` (e.g. the namespace/service labels Kubernetes service discovery would add)."""
    root = Path(tempfile.mkdtemp(prefix="poolwatch-prom-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": targets, "labels": labels or {}}],
            }
        ],
    }
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (root / "prometheus.log").open("w")  # closed by stop()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(proc, port, root, log)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        _wait_ready(server, timeout=30)
    except Exception:
        text = (root / "prometheus.log").read_text()
        server.stop()
        raise RuntimeError(f"prometheus did not start:\n{text}") from None
    return server
