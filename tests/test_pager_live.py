"""Issue 12 end to end, on loopback: two "pods", each an instrumented app under uvicorn with 2
workers plus the sidecar exporter, on one real PostgreSQL; a real Prometheus with the generated
rules (short `for:` windows); a real Alertmanager running the shipped routing with only its
timings shortened; a webhook receiver standing in for PagerDuty and Slack.

The pool is driven into exhaustion in all 4 workers: the pager gets exactly one notification for
that pool, covering both pods, with the runbook link and the pool's name; the warning twin is
inhibited; warnings go to chat; when the load stops, a resolve arrives for the same incident."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

import yaml

from poolwatch.generators.alertmanager import ALERTMANAGER_PATH
from poolwatch.generators.promql import POOL
from poolwatch.generators.rules import RULES_PATH
from tests.support.alerting import (
    SHORT_WINDOWS,
    Load,
    Receiver,
    generate,
    start_alertmanager,
)
from tests.support.apps import AppServer
from tests.support.exporter import Exporter, run_exporter, start_workers
from tests.support.load import burst
from tests.support.net import wait_for
from tests.support.prometheus import start_prometheus

REPO = Path(__file__).resolve().parent.parent
GROUP_WAIT, GROUP_INTERVAL = 8, 4  # seconds; the shipped 30s/5m, shortened for the test


def test_config(receiver: Receiver, secrets: Path) -> dict:
    """The shipped configuration with its timings shortened and its secret files pointing at
    the local receiver; routes, grouping, inhibition and templates are kept as shipped."""
    config = copy.deepcopy(yaml.safe_load((REPO / ALERTMANAGER_PATH).read_text()))
    config["route"]["routes"][0].update(
        group_wait=f"{GROUP_WAIT}s", group_interval=f"{GROUP_INTERVAL}s"
    )
    (secrets / "routing-key").write_text("test-routing-key\n")
    (secrets / "slack-url").write_text(receiver.url("/chat") + "\n")
    receivers = {r["name"]: r for r in config["receivers"]}
    pager = receivers["pager"]["pagerduty_configs"][0]
    pager.update(routing_key_file=str(secrets / "routing-key"), url=receiver.url("/pager"))
    receivers["chat"]["slack_configs"][0]["api_url_file"] = str(secrets / "slack-url")
    return config


test_config.__test__ = False  # a helper, not a test


def start_pod(env: dict[str, str], directory: Path) -> tuple[AppServer, Exporter]:
    """A pod as docs/kubernetes.md deploys it: uvicorn with 2 workers, and the sidecar exporter
    serving both workers' metrics (``worker`` label) on one target."""
    directory.mkdir()
    env = {**env, "POOLWATCH_MULTIPROC_DIR": str(directory)}
    return start_workers("uvicorn", "tests.apps.pool_app:app", 2, env), run_exporter(
        "--multiproc-dir", str(directory)
    )


def test_one_page_per_exhausted_pool_inhibited_warning_then_resolved(postgres, tmp_path):
    generate(str(tmp_path), SHORT_WINDOWS)
    receiver = Receiver()
    started: list = []
    try:
        am = start_alertmanager(test_config(receiver, tmp_path))
        started.append(am)
        env = {
            "SA_URL": postgres.dsn("postgresql+asyncpg"),
            "POOL_SIZE": "2",
            "MAX_OVERFLOW": "0",  # no overflow and a long timeout: only utilization is critical
            "POOL_TIMEOUT": "5",
        }
        pods = [start_pod(env, tmp_path / f"pod-{name}") for name in "ab"]
        started += [server for pod in pods for server in pod]
        apps = [app for app, _ in pods]
        for app in apps:  # open connections now: connecting is not what this test is about
            assert set(asyncio.run(burst(app.url + "/sa/hold?seconds=0.2", 8))) == {200}
        prom = start_prometheus(
            {"orders": [f"127.0.0.1:{exporter.port}" for _, exporter in pods]},
            [str(tmp_path / RULES_PATH)],
            labels={"service": "orders", "namespace": "shop"},
            alertmanager=f"127.0.0.1:{am.port}",
        )
        started.append(prom)
        wait_for(lambda: prom.targets_up() == 2, 30, "both pods scraped")
        maxima = wait_for(
            lambda: len(found := prom.query("db_client_connection_max")) == 4 and found,
            20,
            "the pool of 2 workers in each of 2 pods",
        )
        (pool,) = {s["metric"][POOL] for s in maxima}  # one pool name in every worker

        # 8 clients per pod, a new connection per request (spread over both workers), on
        # pools of 2: every worker's pool runs full
        urls = [app.url + "/sa/hold?seconds=0.2" for app in apps]
        with Load(urls, concurrency=8, limit=90, fresh_connections=True) as load:
            wait_for(lambda: receiver.at("/pager"), 40, "a page")
            inhibited = wait_for(lambda: _inhibited(am, "PoolUtilizationWarning"), 10, "twin muted")
            time.sleep(2 * GROUP_INTERVAL + 2)  # a second page would have come by now
            pages = receiver.at("/pager")
            per_worker = prom.query(
                "max_over_time(poolwatch:db_client_connection_utilization:ratio[20s])"
            )
        stopped = time.monotonic()
        assert set(load.statuses) == {200}, load.statuses

        # every worker of both pods was exhausted ...
        assert len({(s["metric"]["instance"], s["metric"]["worker"]) for s in per_worker}) == 4
        assert all(float(s["value"][1]) == 1.0 for s in per_worker), per_worker
        # ... and that is one page: one alert per pod (workers folded into it), one group
        assert len(pages) == 1, [(p.at, p.body["payload"]["custom_details"]) for p in pages]
        page = pages[0].body
        assert page["event_action"] == "trigger"
        details = page["payload"]["custom_details"]
        assert details["pool"] == pool and details["service"] == "orders"
        assert details["num_firing"] == "2"
        for _, exporter in pods:
            assert f"instance = 127.0.0.1:{exporter.port}" in details["firing"]
        assert "alertname = PoolUtilizationCritical" in details["firing"]
        assert "worker = " not in details["firing"]
        assert "Warning" not in details["firing"]  # warnings never page
        assert page["links"] == [{"href": "alerts/runbook.md#pool_utilization", "text": "runbook"}]
        assert pool in page["payload"]["summary"] and "(2 alerts)" in page["payload"]["summary"]

        # the warning twin is muted by the critical one, in both pods; other warnings (the
        # wait time's, whose critical twin is not firing) reach chat
        assert len(inhibited) == 2
        chat = " ".join(str(c.body) for c in receiver.at("/chat"))
        assert "ConnectionWaitWarning" in chat
        assert "PoolUtilizationWarning" not in chat

        resolve = wait_for(
            lambda: [p for p in receiver.at("/pager") if p.body["event_action"] == "resolve"],
            30,
            "the resolve",
        )
        assert resolve[0].body["dedup_key"] == page["dedup_key"]  # closes the same incident
        assert resolve[0].at > stopped
        assert all(p.body["dedup_key"] == page["dedup_key"] for p in receiver.at("/pager"))
    finally:
        for server in reversed(started):
            server.stop()
        receiver.stop()


def _inhibited(am, alertname: str) -> list[dict]:
    alerts = am.get_json("/api/v2/alerts", filter=f'alertname="{alertname}"')
    return [a for a in alerts if a["status"]["inhibitedBy"]]
