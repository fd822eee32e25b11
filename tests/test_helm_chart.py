"""The Helm chart, rendered and checked offline (no cluster here): helm-python-sdk renders and
lints, kubernetes-validate --strict checks every built-in object for two Kubernetes versions,
our own checks cover the Prometheus Operator's custom resources, promtool the rule groups; the
values schema, the secure defaults and the generated files too. What the chart hands to
Grafana, Alertmanager and an app's own chart: test_helm_integration.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import helm_python as helm
import pytest
import yaml

from poolwatch.generators import rules
from poolwatch.generators.rules import ANTIPATTERN_ALERTS
from poolwatch.thresholds import defaults
from tests.support.helmchart import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    ROOT,
    VALUE_SETS,
    assert_locked_down,
    by_kind,
    custom_resource_errors,
    is_custom,
    kubernetes_errors,
    objects,
    promtool_check,
    render,
    rules_of,
)


def test_ci_values_cover_every_feature_on_off_and_a_custom_threshold():
    assert {p.name for p in CI_VALUES} >= {
        "all-on-values.yaml",
        "all-off-values.yaml",
        "custom-threshold-values.yaml",
    }


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_lint_strict_is_clean(values_name, kube_version):
    report = helm.lint(CHART, VALUE_SETS[values_name], strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == []


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_every_object_is_valid_for_two_kubernetes_versions(values_name):
    objs = objects(render(VALUE_SETS[values_name]))
    for version in KUBE_VERSIONS:
        errors = [kubernetes_errors(o, version) for o in objs if not is_custom(o)]
        assert [e for e in errors if e] == [], version
    custom = {o["kind"]: custom_resource_errors(o) for o in objs if is_custom(o)}
    assert {kind: errs for kind, errs in custom.items() if errs} == {}


def test_all_on_renders_every_kind_and_all_off_renders_nothing():
    on = objects(render(VALUE_SETS["all-on-values.yaml"]))
    kinds = {o["kind"] for o in on}
    assert kinds >= {
        "Deployment", "Service", "ConfigMap", "ServiceAccount",
        "PodMonitor", "ServiceMonitor", "PrometheusRule", "AlertmanagerConfig",
    }  # fmt: skip
    off = render(VALUE_SETS["all-off-values.yaml"])
    assert objects(off) == []
    assert "Nothing scrapes poolwatch yet" in off["poolwatch/templates/NOTES.txt"]


FEATURES = {
    "podMonitor": {"PodMonitor"},
    "serviceMonitor": {"ServiceMonitor"},
    "alerts": {"PrometheusRule"},
    "alertmanagerConfig": {"AlertmanagerConfig"},
    "exporter": {"Deployment", "Service", "ConfigMap", "ServiceAccount", "ServiceMonitor"},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_a_disabled_feature_renders_nothing(feature):
    values = yaml.safe_load((CHART / "ci/all-on-values.yaml").read_text())
    if feature == "alerts":
        values["dashboards"]["enabled"] = False  # they keep the recording rules (tested below)
    before = objects(render(values))
    values[feature]["enabled"] = False
    if feature == "exporter":
        values["serviceMonitor"]["enabled"] = False  # it scrapes the exporter
    after = objects(render(values))
    gone = {(o["kind"], o["metadata"]["name"]) for o in before} - {
        (o["kind"], o["metadata"]["name"]) for o in after
    }
    assert gone and {kind for kind, _ in gone} == FEATURES[feature]
    assert not any(o["kind"] in FEATURES[feature] - {"ConfigMap"} for o in after)


def test_prometheus_annotations_only_when_enabled():
    def annotations(values):
        (deployment,) = by_kind(objects(render(values)), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]

    base = {"exporter": {"enabled": True, "postgres": {"dsnSecret": {"name": "pg"}}}}
    assert not any(k.startswith("prometheus.io/") for k in annotations(base))
    on = annotations({**base, "prometheusAnnotations": {"enabled": True}})
    assert on["prometheus.io/scrape"] == "true" and on["prometheus.io/port"] == "9464"


# --- alert rules --------------------------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "custom-threshold-values.yaml"])
def test_promtool_accepts_the_rendered_rule_groups(values_name, tmp_path):
    (rule,) = by_kind(objects(render(VALUE_SETS[values_name])), "PrometheusRule")
    groups = rule["spec"]["groups"]
    result = promtool_check(groups, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in groups)
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_default_values_render_exactly_the_projects_rule_groups():
    (rule,) = by_kind(objects(render({})), "PrometheusRule")
    assert rule["spec"]["groups"] == rules.rule_groups(defaults())


def test_default_rules_carry_the_threshold_table():
    rules = rules_of({})
    table = defaults()
    signals = {r["labels"]["signal"] for r in rules.values() if "alert" in r}
    assert signals == set(table) | set(ANTIPATTERN_ALERTS)  # a warning and a critical per signal
    for name, rule in rules.items():
        if "alert" not in rule or rule["labels"]["signal"] in ANTIPATTERN_ALERTS:
            continue
        threshold = table[rule["labels"]["signal"]]
        value = getattr(threshold, rule["labels"]["severity"])
        assert re.search(rf">\s*{re.escape(f'{value:g}')}(\s|\)|$)", rule["expr"]), name
        assert rule["for"] == threshold.for_, name


def test_a_custom_threshold_arrives_in_the_rendered_expression():
    custom = rules_of(VALUE_SETS["custom-threshold-values.yaml"])
    default = rules_of({})
    warning = custom["PoolUtilizationWarning"]
    assert re.search(r">\s*0\.65(\s|\)|$)", warning["expr"])
    assert not re.search(r">\s*0\.7(\s|\)|$)", warning["expr"])
    assert warning["for"] == "7m" and custom["PoolUtilizationCritical"]["for"] == "7m"
    assert re.search(r">\s*25(\s|\)|$)", custom["CheckoutTimeoutsCritical"]["expr"])
    # the rest keeps the table's values; the disabled alert is gone
    assert custom["PoolUtilizationCritical"]["expr"] == default["PoolUtilizationCritical"]["expr"]
    assert "PoolOverflowWarning" not in custom and "PoolOverflowCritical" in custom
    # an integer from --set (int64, not float64) works the same
    rules = rules_of({"alerts": {"thresholds": {"loop_lag_p99": {"critical": 2}}}})
    assert re.search(r">\s*2(\s|\)|$)", rules["EventLoopLagCritical"]["expr"])


def test_prometheus_templates_in_annotations_survive_helm():
    rules = rules_of({})
    description = rules["PoolUtilizationCritical"]["annotations"]["description"]
    assert "{{ $value" in description and "{{ $labels." in description


def test_rule_labels_are_added_to_every_alert():
    rules = rules_of({"alerts": {"ruleLabels": {"team": "payments"}}})
    alerts = [r for r in rules.values() if "alert" in r]
    assert alerts and all(r["labels"]["team"] == "payments" for r in alerts)
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in alerts)


def test_every_threshold_for_and_window_is_a_value():
    table = defaults()
    custom = {}
    for i, (key, t) in enumerate(table.items()):
        custom[key] = {"warning": 3.01 + i, "critical": 50.5 + i, "for": f"{17 + i}m"}
        if getattr(t, "window", None):
            custom[key]["window"] = f"{31 + i}s"
    rules = rules_of({"alerts": {"thresholds": custom}})
    alerts = [r for r in rules.values() if "alert" in r]
    assert {r["labels"]["signal"] for r in alerts} == set(table) | set(ANTIPATTERN_ALERTS)
    alerts = [r for r in alerts if r["labels"]["signal"] not in ANTIPATTERN_ALERTS]
    for rule in alerts:
        values = custom[rule["labels"]["signal"]]
        value = values[rule["labels"]["severity"]]
        assert re.search(rf">\s*{re.escape(f'{value:g}')}(\s|\)|$)", rule["expr"]), rule["alert"]
        assert rule["for"] == values["for"], rule["alert"]
    text = json.dumps(list(rules.values()))
    for key, values in custom.items():
        if "window" in values:
            assert f"[{values['window']}]" in text, key
    # nothing of the table's defaults is left behind in an alert
    for rule in alerts:
        default = getattr(table[rule["labels"]["signal"]], rule["labels"]["severity"])
        assert not re.search(rf">\s*{re.escape(f'{default:g}')}(\s|\)|$)", rule["expr"])


def test_runbook_links_follow_the_base_url():
    rules = rules_of({"alerts": {"runbookBaseUrl": "https://wiki.example.com/poolwatch"}})
    alerts = [r for r in rules.values() if "alert" in r]
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://wiki.example.com/poolwatch#"), url


# --- values schema and clear errors -------------------------------------------------------

BAD_VALUES = [
    ({"replicaCount": 2}, "replicaCount"),
    ({"podMonitor": {"intervall": "30s"}}, "intervall"),
    ({"sidecar": {"port": "9464"}}, "port"),
    ({"sidecar": {"port": 70000}}, "port"),
    ({"exporter": {"postgres": {"dsn": "postgresql://u:p@db/x"}}}, "dsn"),
    ({"alerts": {"thresholds": {"pool_utilisation": {"warning": 0.5}}}}, "pool_utilisation"),
    ({"alerts": {"thresholds": {"pool_utilization": {"warning": "high"}}}}, "warning"),
    ({"alerts": {"thresholds": {"pool_utilization": {"warning": -1}}}}, "warning"),
    ({"alerts": {"thresholds": {"pool_utilization": {"for": "5 minutes"}}}}, "for"),
    ({"alerts": {"ruleLabels": {"severity": "info"}}}, "ruleLabels/severity"),
    ({"dashboards": {"enabled": "yes"}}, "enabled"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
]


@pytest.mark.parametrize(("values", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_bad_values_are_rejected_by_the_schema_naming_the_key(values, key):
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    message = str(info.value)
    assert "values don't meet the specifications of the schema" in message
    assert key in message, message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"exporter": {"enabled": True}},
            "exporter.enabled needs exporter.postgres.dsnSecret.name",
        ),
        ({"serviceMonitor": {"enabled": True}}, "set exporter.enabled=true too"),
        ({"alertmanagerConfig": {"enabled": True}}, "alertmanagerConfig.enabled needs"),
        (
            {"alerts": {"thresholds": {"pool_utilization": {"warning": 0.95}}}},
            "alerts.thresholds.pool_utilization.warning must not exceed",
        ),
    ],
)
def test_inconsistent_values_stop_the_render_with_the_fix(values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


# --- secure defaults, checksums, image ----------------------------------------------------


def containers_of(objs):
    for deployment in by_kind(objs, "Deployment"):
        yield (
            deployment["spec"]["template"]["spec"],
            deployment["spec"]["template"]["spec"]["containers"],
        )


def test_standalone_exporter_is_locked_down_and_reads_the_dsn_from_a_secret():
    objs = objects(render(VALUE_SETS["all-on-values.yaml"]))
    ((pod_spec, (container,)),) = list(containers_of(objs))
    assert_locked_down(container, pod_spec)
    assert pod_spec["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["POOLWATCH_POSTGRES_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "poolwatch-postgres",
        "key": "dsn",
    }
    assert env["POOLWATCH_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "poolwatch-token"
    assert not any("dsn" in arg.lower() for arg in container["args"])  # not in argv either
    assert not any("postgresql://" in json.dumps(o) for o in objs)
    assert container["image"].startswith("poolwatch@sha256:")


def test_exporter_pods_roll_when_their_config_changes():
    base = {"exporter": {"enabled": True, "postgres": {"dsnSecret": {"name": "pg"}}}}

    def checksum(values):
        (deployment,) = by_kind(objects(render(values)), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    changed = {"exporter": {**base["exporter"], "env": {"PYTHONUNBUFFERED": "1"}}}
    assert checksum(base) == checksum(base)
    assert checksum(changed) != checksum(base)


def test_image_tag_is_the_app_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == chart["appVersion"]
    import poolwatch

    assert chart["appVersion"] == poolwatch.__version__


# --- monitors select what they should ------------------------------------------------------


def test_monitors_send_the_token_and_name_the_exporters_port():
    objs = objects(render(VALUE_SETS["all-on-values.yaml"]))
    (pod_monitor,) = by_kind(objs, "PodMonitor")
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "poolwatch-token", "key": "token"}
    assert endpoint["relabelings"][0] == {
        "action": "replace",
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
        "targetLabel": "service",
    }
    assert pod_monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (service_monitor,) = by_kind(objs, "ServiceMonitor")
    (service,) = by_kind(objs, "Service")
    (deployment,) = by_kind(objs, "Deployment")
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["port"] in port_names


# --- generated files, docs -----------------------------------------------------------------


def test_generate_check_covers_the_chart(tmp_path):
    def generate(*args):
        return subprocess.run(
            [sys.executable, "-m", "poolwatch.cli", "generate", *args],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip

    assert generate("--check").returncode == 0  # the committed chart is up to date
    stale = generate("--check", "--root", str(tmp_path))
    assert stale.returncode == 1
    for name in ("templates/prometheusrule.yaml", "values.yaml", "values.schema.json", "README.md"):
        assert f"missing: helm/poolwatch/{name}" in stale.stdout  # an empty root
    overrides = tmp_path / "mine.toml"
    overrides.write_text('[pool_utilization]\nwarning = 0.6\nfor = "10m"\n')
    assert generate("--overrides", str(overrides), "--root", str(tmp_path)).returncode == 0
    values = yaml.safe_load((tmp_path / "helm/poolwatch/values.yaml").read_text())
    assert values["alerts"]["thresholds"]["pool_utilization"] == {
        "warning": 0.6,
        "critical": 0.9,
        "for": "10m",
    }


def test_values_table_documents_every_threshold_and_notes_tell_the_next_step():
    readme = (CHART / "README.md").read_text()
    for key in defaults():
        for field in ("warning", "critical", "for"):
            assert f"| `alerts.thresholds.{key}.{field}` |" in readme
    assert "## Upgrade notes" in readme
    notes = render()["poolwatch/templates/NOTES.txt"]
    assert "Next step: add the poolwatch sidecar" in notes
    assert 'include "poolwatch.sidecar.container" .Values.poolwatch' in notes
