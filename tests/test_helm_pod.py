"""The chart's containers run as Kubernetes would run them, on loopback, with the real
``poolwatch exporter``: the README's app Deployment (uvicorn workers + the sidecar sharing the
emptyDir) on a real PostgreSQL, and the standalone exporter reading that PostgreSQL's view.

What the kubelet would do is done here from the rendered objects: Secrets and ConfigMaps become
the environment, the emptyDir a temporary directory, the probes and the PodMonitor's scrape are
HTTP requests. The one change is the listen address: the pod listens on 0.0.0.0, the test on
127.0.0.1."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import planted
from tests.support.apps import REPO
from tests.support.exporter import Exporter, start_poolwatch, start_workers
from tests.support.helmchart import by_kind, make_app_chart, objects, render
from tests.support.net import free_port, get, scrape, wait_for
from tests.support.postgres import PASSWORD
from tests.test_multiproc import workers_of

TOKEN = planted.METRICS_TOKEN


def local_container(
    container: dict[str, Any],
    volumes: dict[str, str],
    secrets: dict[tuple[str, str], str],
    config_maps: dict[str, dict[str, str]] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The container's arguments and environment as the kubelet resolves them, with each volume
    mounted at a local directory instead of its mountPath."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update((config_maps or {})[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}

    def local(text: str) -> str:
        for path, directory in mounts.items():
            text = text.replace(path, directory)
        return text

    args = [local(arg) for arg in container.get("args", [])]
    if "--addr" in args:
        at = args.index("--addr") + 1
        assert args[at] == "0.0.0.0"  # reachable by the kubelet and Prometheus in a pod
        args[at] = "127.0.0.1"
    return args, {name: local(value) for name, value in env.items()}


def run_image(
    container: dict[str, Any], args: list[str], env: dict[str, str], log_dir: Path
) -> Exporter:
    """The image's entrypoint is ``poolwatch``: run it with the container's arguments."""
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "poolwatch"]
    log_path = str(log_dir / f"{container['name']}.log")
    clean = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join([REPO, f"{REPO}/agent"])}
    return start_poolwatch(args, {**clean, **env}, port, log_path)


def probe(exporter: Exporter, container: dict[str, Any]) -> None:
    """The kubelet's liveness and readiness probes: HTTP 200 on the named port, no token."""
    for kind in ("livenessProbe", "readinessProbe"):
        check = container[kind]["httpGet"]
        assert check["port"] == "poolwatch"
        get(f"{exporter.url}{check['path']}")  # raises on a status >= 400


def scrape_like(endpoint: dict[str, Any], exporter: Exporter, token: str):
    """What Prometheus does for a PodMonitor/ServiceMonitor endpoint with authorization."""
    url = f"{exporter.url}{endpoint['path']}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(url)
    assert refused.value.code == 401
    return scrape(url, headers={"Authorization": f"Bearer {token}"})


def test_readme_deployment_runs_one_target_for_all_workers(tmp_path, postgres):
    app_chart = make_app_chart(tmp_path)
    values = {"poolwatch": {"sidecar": {"port": free_port()}}}
    values["poolwatch"]["metricsToken"] = {"existingSecret": "metrics-token"}
    manifests = objects(render(values, chart=app_chart, name="shop"))
    (deployment,) = by_kind(manifests, "Deployment")
    (pod_monitor,) = by_kind(manifests, "PodMonitor")
    pod = deployment["spec"]["template"]["spec"]
    api, sidecar = pod["containers"]
    (volume,) = pod["volumes"]
    volumes = {volume["name"]: str(tmp_path / "emptydir")}
    secrets = {("metrics-token", "token"): TOKEN}
    os.makedirs(volumes[volume["name"]])

    _, api_env = local_container(api, volumes, secrets)
    app = start_workers(
        "uvicorn",
        "tests.apps.pool_app:app",
        2,
        {**api_env, "SA_URL": postgres.dsn("postgresql+asyncpg")},
    )
    exporter = None
    try:
        args, env = local_container(sidecar, volumes, secrets)
        exporter = run_image(sidecar, args, env, tmp_path)
        probe(exporter, sidecar)
        (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]

        def both_workers():
            return len(workers_of(scrape_like(endpoint, exporter, TOKEN))) == 2

        wait_for(both_workers, timeout=30)
        samples = scrape_like(endpoint, exporter, TOKEN)
        (pool_max,) = {s.value for s in samples.find("db_client_connection_max")}
        assert pool_max == 3  # pool_app: pool_size 2 + max_overflow 1, in each worker
    finally:
        if exporter is not None:
            assert exporter.stop() == 0, exporter.log()  # SIGTERM, as at pod shutdown
        app.stop()


def test_standalone_exporter_reads_the_database_view_from_the_secret(tmp_path, postgres):
    port = free_port()
    values = {
        "exporter": {
            "enabled": True,
            "port": port,
            "postgres": {"dsnSecret": {"name": "pg"}},
            "env": {"PYTHONUNBUFFERED": "1"},
        },
        "metricsToken": {"existingSecret": "metrics-token"},
        "serviceMonitor": {"enabled": True},
    }
    manifests = objects(render(values))
    (deployment,) = by_kind(manifests, "Deployment")
    (service_monitor,) = by_kind(manifests, "ServiceMonitor")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: str(tmp_path / v["name"]) for v in pod["volumes"]}
    secrets = {("pg", "dsn"): postgres.dsn(), ("metrics-token", "token"): TOKEN}
    config_maps = {c["metadata"]["name"]: c["data"] for c in by_kind(manifests, "ConfigMap")}
    args, env = local_container(container, volumes, secrets, config_maps)
    for directory in volumes.values():
        os.makedirs(directory)

    exporter = run_image(container, args, env, tmp_path)
    try:
        probe(exporter, container)
        samples = scrape_like(service_monitor["spec"]["endpoints"][0], exporter, TOKEN)
        server = {"server_address": "127.0.0.1", "server_port": str(postgres.port)}
        assert samples.value("postgresql_up", **server) == 1
        assert samples.value("postgresql_connection_max", **server) == 200
        with open(f"/proc/{exporter.proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode()
        assert PASSWORD not in cmdline and "postgresql://" not in cmdline
        assert PASSWORD not in yaml.safe_dump(manifests)
    finally:
        assert exporter.stop() == 0, exporter.log()
