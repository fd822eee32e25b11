"""What the Helm chart hands to others, rendered offline: the dashboards as ConfigMaps for
Grafana's sidecar, the deployment's selector in every rule and dashboard, the recording rules
the dashboards keep when alerts are off, the AlertmanagerConfig that routes the alerts (as
alerts/alertmanager.yml does), and the sidecar in a user's app chart as the chart's README
shows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from poolwatch.generators import alertmanager, rules
from poolwatch.thresholds import defaults
from tests.support.helmchart import (
    CHART,
    KUBE_VERSIONS,
    ROOT,
    VALUE_SETS,
    assert_locked_down,
    by_kind,
    kubernetes_errors,
    make_app_chart,
    objects,
    readme_blocks,
    render,
    rules_of,
)

SIDECAR = "Add the sidecar to your app"


# --- dashboards ----------------------------------------------------------------------------


@pytest.fixture
def chart_with_dashboard(tmp_path):
    """A copy of the chart with one dashboard file (the generated ones land with issue 7)."""
    copy = tmp_path / "poolwatch"
    shutil.copytree(CHART, copy)
    dashboard = {"uid": "poolwatch-overview", "title": "poolwatch / Overview", "panels": []}
    (copy / "dashboards").mkdir(exist_ok=True)  # git keeps no empty directory
    (copy / "dashboards" / "poolwatch_overview.json").write_text(json.dumps(dashboard))
    return copy, dashboard


def test_dashboards_become_configmaps_for_the_grafana_sidecar(chart_with_dashboard):
    chart, dashboard = chart_with_dashboard

    def config_map_of(values=None):
        name = "rel-poolwatch-dashboard-poolwatch-overview"
        found = by_kind(objects(render(values, chart=chart)), "ConfigMap")
        assert len(found) == len(list((chart / "dashboards").glob("*.json")))
        (config_map,) = [o for o in found if o["metadata"]["name"] == name]
        return config_map

    config_map = config_map_of()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "poolwatch"}
    assert json.loads(config_map["data"]["poolwatch_overview.json"]) == dashboard
    for version in KUBE_VERSIONS:
        assert kubernetes_errors(config_map, version) is None

    values = {
        "dashboards": {
            "label": "my_dashboards",
            "labelValue": "yes",
            "folder": "DB",
            "namespace": "grafana",
        }
    }
    custom = config_map_of(values)
    assert custom["metadata"]["labels"]["my_dashboards"] == "yes"
    assert "grafana_dashboard" not in custom["metadata"]["labels"]
    assert custom["metadata"]["annotations"] == {"grafana_folder": "DB"}
    assert custom["metadata"]["namespace"] == "grafana"
    assert (
        by_kind(objects(render({"dashboards": {"enabled": False}}, chart=chart)), "ConfigMap") == []
    )


def shipped_dashboards(values) -> dict[str, dict]:
    maps = by_kind(objects(render(values)), "ConfigMap")
    return {k: json.loads(v) for m in maps for k, v in m["data"].items() if k.endswith(".json")}


def test_chart_dashboards_are_the_generated_ones_with_the_charts_selector():
    """The chart ships the dashboards `poolwatch generate` writes, and puts `.Values.selector`
    where `poolwatch generate --overrides` puts the table's."""
    from poolwatch.generators import dashboards

    committed = {p.name: json.loads(p.read_text()) for p in (ROOT / "dashboards").glob("*.json")}
    assert len(committed) == 4 and shipped_dashboards({}) == committed
    table = defaults()
    table.selector = 'job=~"shop.*", namespace!="test"'
    generated = {Path(p).name: json.loads(t) for p, t in dashboards.render(table).items()}
    assert shipped_dashboards({"selector": table.selector}) == generated
    assert 'namespace!=\\"test\\"' in json.dumps(generated)


def test_the_charts_selector_reaches_every_rule():
    table = defaults()
    table.selector = 'job=~"shop.*"'
    (rule,) = by_kind(objects(render({"selector": table.selector})), "PrometheusRule")
    assert rule["spec"]["groups"] == rules.rule_groups(table)
    assert rule["spec"]["groups"] != rules.rule_groups(defaults())


def test_the_recording_rules_stay_for_the_dashboards_when_alerts_are_off():
    (rule,) = by_kind(objects(render({"alerts": {"enabled": False}})), "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    assert [r.get("alert") for r in group["rules"]] == [None] * 7  # the 7 recording rules
    off = {"alerts": {"enabled": False}, "dashboards": {"enabled": False}}
    assert by_kind(objects(render(off)), "PrometheusRule") == []


# --- the alert routing ----------------------------------------------------------------------


def alertmanager_config(values):
    (config,) = by_kind(objects(render(values)), "AlertmanagerConfig")
    return config["spec"]


def test_alertmanager_config_pages_critical_and_chats_warning():
    spec = alertmanager_config(VALUE_SETS["all-on-values.yaml"])
    route = spec["route"]
    assert route["matchers"] == [{"name": "signal", "value": ".+", "matchType": "=~"}]
    routes = {r["matchers"][0]["value"]: r["receiver"] for r in route["routes"]}
    assert routes == {"critical": "pager", "warning": "chat"}
    receivers = {r["name"]: r for r in spec["receivers"]}
    assert receivers["pager"]["pagerdutyConfigs"][0]["routingKey"] == {
        "name": "alert-receivers",
        "key": "pagerduty-routing-key",
    }
    assert receivers["chat"]["webhookConfigs"][0]["urlSecret"] == {
        "name": "alert-receivers",
        "key": "chat-url",
    }
    slack = alertmanager_config(
        {"alertmanagerConfig": {"enabled": True, "pager": {"secret": {"name": "a"}},
                                "chat": {"secret": {"name": "b"}}}}
    )  # fmt: skip
    chat = {r["name"]: r for r in slack["receivers"]}["chat"]["slackConfigs"][0]
    assert chat["apiURL"] == {"name": "b", "key": "slack-webhook-url"}
    assert chat["titleLink"] == "{{ (index .Alerts 0).Annotations.runbook_url }}"
    (inhibit,) = spec["inhibitRules"]
    assert inhibit["sourceMatch"][0]["value"] == "critical"
    assert inhibit["targetMatch"] == [{"name": "severity", "value": "warning", "matchType": "="}]
    # twins share every label the inhibition compares that the rules set themselves
    rules = rules_of({})
    twins = rules["PoolUtilizationCritical"]["labels"], rules["PoolUtilizationWarning"]["labels"]
    assert "signal" in inhibit["equal"] and twins[0]["signal"] == twins[1]["signal"]


def test_alertmanager_defaults_group_and_inhibit_like_the_alert_rules():
    spec = alertmanager_config(VALUE_SETS["all-on-values.yaml"])
    assert spec["route"]["groupBy"] == alertmanager.GROUP_BY
    assert spec["inhibitRules"][0]["equal"] == alertmanager.INHIBIT_EQUAL


def test_alertmanager_config_mirrors_alerts_alertmanager_yml():
    path = ROOT / "alerts" / "alertmanager.yml"
    if not path.exists():
        pytest.skip("alerts/alertmanager.yml (issue 12) is not on this branch yet")
    plain = yaml.safe_load(path.read_text())
    spec = alertmanager_config(VALUE_SETS["all-on-values.yaml"])
    (poolwatch_route,) = plain["route"]["routes"]
    assert poolwatch_route["matchers"] == ['signal=~".+"']
    assert spec["route"]["groupBy"] == poolwatch_route["group_by"]
    for plain_key, key in [("group_wait", "groupWait"), ("group_interval", "groupInterval"),
                           ("repeat_interval", "repeatInterval")]:  # fmt: skip
        assert spec["route"][key] == poolwatch_route[plain_key]
    plain_routes = {r["matchers"][0]: r for r in poolwatch_route["routes"]}
    for sub in spec["route"]["routes"]:
        twin = plain_routes[f'severity="{sub["matchers"][0]["value"]}"']
        assert (sub["receiver"], sub["repeatInterval"]) == (
            twin["receiver"],
            twin["repeat_interval"],
        )
    (inhibit,) = plain["inhibit_rules"]
    assert spec["inhibitRules"][0]["equal"] == inhibit["equal"]
    assert {r["name"] for r in plain["receivers"]} == {r["name"] for r in spec["receivers"]}


# --- the sidecar in a user's chart, from the README ----------------------------------------


@pytest.fixture
def app_chart(tmp_path):
    return make_app_chart(tmp_path)


def test_readme_snippet_adds_a_valid_sidecar_that_the_podmonitor_scrapes(app_chart):
    app = app_chart
    objs = objects(render(chart=app, name="shop"))
    (deployment,) = by_kind(objs, "Deployment")
    for version in KUBE_VERSIONS:
        assert kubernetes_errors(deployment, version) is None
    pod = deployment["spec"]["template"]
    api, exporter = pod["spec"]["containers"]
    assert exporter["name"] == "poolwatch-exporter"
    assert_locked_down(exporter, pod["spec"])
    shared = {v["name"]: v for v in pod["spec"]["volumes"]}["poolwatch-multiproc"]
    assert shared["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
    directory = {e["name"]: e["value"] for e in api["env"]}["POOLWATCH_MULTIPROC_DIR"]
    assert {"name": "poolwatch-multiproc", "mountPath": directory} in api["volumeMounts"]
    assert {"name": "poolwatch-multiproc", "mountPath": directory} in exporter["volumeMounts"]
    assert exporter["args"][:3] == ["exporter", "--multiproc-dir", directory]
    assert pod["metadata"]["annotations"]["checksum/poolwatch-sidecar"]
    # the dependency's PodMonitor selects these pods on the exporter's port
    (pod_monitor,) = by_kind(objs, "PodMonitor")
    assert (
        pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in exporter["ports"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_sidecar_values_flow_through_the_parent_chart(app_chart):
    app = app_chart
    (several,) = [b for b in readme_blocks(SIDECAR) if b.startswith("poolwatch:")]
    values = yaml.safe_load(several)
    values["poolwatch"] |= {"sidecar": {"port": 9500}, "prometheusAnnotations": {"enabled": True}}
    values["poolwatch"]["metricsToken"] = {"existingSecret": "metrics-token"}
    objs = objects(render(values, chart=app, name="shop"))
    assert [o["kind"] for o in objs] == ["Deployment"]  # the monitoring objects live elsewhere
    pod = objs[0]["spec"]["template"]
    exporter = pod["spec"]["containers"][1]
    assert exporter["ports"][0]["containerPort"] == 9500 and "9500" in exporter["args"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9500"
    token = {e["name"]: e for e in exporter["env"]}["POOLWATCH_METRICS_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "metrics-token"
    for version in KUBE_VERSIONS:
        assert kubernetes_errors(objs[0], version) is None
    (default,) = by_kind(objects(render(chart=app, name="shop")), "Deployment")
    default = default["spec"]["template"]["metadata"]
    assert (
        default["annotations"]["checksum/poolwatch-sidecar"]
        != pod["metadata"]["annotations"]["checksum/poolwatch-sidecar"]
    )


def test_readme_plain_manifest_is_what_the_templates_render(app_chart):
    app = app_chart
    (plain,) = [yaml.safe_load(b) for b in readme_blocks(SIDECAR) if b.startswith("containers:")]
    (deployment,) = by_kind(objects(render(chart=app, name="shop")), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert plain["containers"][1] == spec["containers"][1]
    assert plain["volumes"] == spec["volumes"]
    assert plain["containers"][0]["env"] == spec["containers"][0]["env"]
    assert plain["containers"][0]["volumeMounts"] == spec["containers"][0]["volumeMounts"]
