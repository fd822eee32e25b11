"""A real Prometheus server (Debian package) scraping loopback targets, and its HTTP API."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from .net import free_port, get, wait_for
from .servers import Server, start_server


class PromQLError(RuntimeError):
    """Prometheus rejected a query (bad syntax, type error, ...)."""


class Prometheus(Server):
    def api(self, path: str, **params: str | list[str]) -> Any:
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

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def firing(self) -> list[dict]:
        return [a for a in self.alerts() if a["state"] == "firing"]

    def targets_up(self) -> int:
        return sum(t["health"] == "up" for t in self.api("targets")["activeTargets"])

    def wait_for_targets(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` targets are up (the first scrape comes ~5 s after start)."""
        wait_for(lambda: len(self.query("up == 1")) >= count, timeout, f"{count} targets up")


def start_prometheus(
    jobs: dict[str, list[str]],
    rule_files: Iterable[str] = (),
    *,
    labels: dict[str, str] | None = None,
    alertmanager: str | None = None,
) -> Prometheus:
    """Scrapes ``jobs`` {job: [host:port of /metrics]} every second, with extra target
    ``labels`` (e.g. the namespace/service labels Kubernetes service discovery would add), and
    evaluates ``rule_files`` every second."""
    root, port = tempfile.mkdtemp(prefix="poolwatch-prom-"), free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [os.path.abspath(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets, "labels": labels or {}}]}
            for job, targets in jobs.items()
        ],
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    with open(os.path.join(root, "prometheus.yml"), "w") as f:
        json.dump(config, f)  # JSON is YAML
    args = [
        f"--config.file={root}/prometheus.yml",
        f"--storage.tsdb.path={root}/data",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    prom = start_server("prometheus", args, port, root, cls=Prometheus)
    try:
        wait_for(lambda: _ready(prom), 30, "Prometheus ready")
    except AssertionError:
        prom.stop()
        raise
    return prom


def _ready(server: Server) -> bool:
    try:
        get(f"{server.url}/-/ready", timeout=2)
        return True
    except OSError:  # connection refused, or 503 while the TSDB opens
        return False
